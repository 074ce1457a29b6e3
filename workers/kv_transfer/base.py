"""The KV transport interface: move one layer's KV of one handoff to a peer worker."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from batonserve.workers.kv_transfer.config import KVTransferConfig

FINAL_LAYER = -1  # a chunk with this layer carries the first token and no KV


class KVTransferError(RuntimeError):
    """A handoff's KV could not be moved (peer died, timed out, channel missing)."""


@dataclass(frozen=True)
class KVSpec:
    """What must match between two workers for KV to be handed over as-is."""

    model: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def check_compatible(self, other: KVSpec) -> None:
        """Raise KVTransferError naming the first field that differs."""
        for name in ("model", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise KVTransferError(f"incompatible workers for KV handoff: {name} {a!r} != {b!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The KV tensors' dtype."""
        return getattr(torch, self.dtype)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class KVChunk:
    """One layer's KV for token positions [start, start + n) of a handoff, or the final marker."""

    handoff_id: int
    layer: int  # FINAL_LAYER for the marker that carries the first token
    start: int
    kv: torch.Tensor | None  # [2, n, heads, head_dim] contiguous (k then v); None on marker
    first_token: int = -1
    head: int = 0  # the model's number of kv's first KV head (a TP rank sends a range of heads)

    @property
    def num_tokens(self) -> int:
        """Token positions covered."""
        return 0 if self.kv is None else int(self.kv.shape[1])

    @property
    def num_heads(self) -> int:
        """KV heads covered."""
        return 0 if self.kv is None else int(self.kv.shape[2])


@dataclass(frozen=True)
class ChannelAddress:
    """Where the sender of a per-pair channel listens for its receiver's rendezvous."""

    host: str
    port: int
    generation: int  # bumps on every rebuild so stale rendezvous keys never match
    lane: str = ""  # "i-j": the channel of sender rank i to receiver rank j ("": rank 0 to 0)


def rank_peer(worker: str, rank: int) -> str:
    """The transport's name for rank `rank` of worker `worker` (rank 0: the worker itself)."""
    return worker if rank == 0 else f"{worker}/tp{rank}"


def split_peer(peer: str) -> tuple[str, int]:
    """(worker, rank) of a name made by rank_peer."""
    worker, sep, rank = peer.rpartition("/tp")
    return (worker, int(rank)) if sep and rank.isdigit() else (peer, 0)


Deliver = Callable[[str, KVChunk], None]  # (peer, chunk), called on a transport thread
OnError = Callable[[str, Exception], None]  # (peer, error): every handoff with peer has failed


class KVTransport(ABC):
    """Moves KV chunks between workers; sends are queued and never block the caller."""

    def __init__(
        self,
        local: str,
        spec: KVSpec,
        cfg: KVTransferConfig,
        deliver: Deliver,
        on_error: OnError,
        host: str = "127.0.0.1",
        namespace: str = "batonserve",
    ) -> None:
        self.local = local
        self.spec = spec
        self.cfg = cfg
        self.deliver = deliver
        self.on_error = on_error
        self.host = host
        self.namespace = namespace
        self.peer_sizes: dict[str, int] = {}  # peer worker -> its TP size (workers/tp/kv_lanes)
        self._lock = threading.Lock()

    @abstractmethod
    def send(self, peer: str, chunk: KVChunk) -> None:
        """Queue `chunk` for `peer`; chunks to one peer leave in order."""

    def listen(self, peer: str) -> ChannelAddress | None:
        """Sender side of a new channel to `peer`: start listening (None: nothing to set up)."""
        return None

    def connect(self, peer: str, addr: ChannelAddress, sender: bool) -> None:
        """Join the channel `peer` -> self (sender=False) or self -> `peer` (sender=True)."""
        return None

    def push(self, peer: str, chunk: KVChunk) -> None:
        """A chunk pushed by `peer` through the control plane (object store transport)."""
        self.deliver(peer, chunk)

    def close_peer(self, peer: str) -> None:
        """Drop every channel with `peer` (it died or was replaced)."""
        return None

    def close(self) -> None:
        """Stop all threads and channels."""
        return None


TransportFactory = type[KVTransport]

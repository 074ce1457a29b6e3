"""KV handoff rank to rank: every rank of a prefill group sends the KV heads each decode rank owns.

`head_routes` says which heads go from sender rank i to receiver rank j. Each rank has its own
transport (rank 0's is the worker's); a lane is the channel of one (i, j) route, named by
`rank_peer`. Rank 0 stays the control point: its exporter decides, per layer, which positions
leave, tells each follower which of its heads to send (a small Ray call; the tensors never pass
through rank 0), and sends its own. On the decode side each rank stages the heads it owns; a
follower tells rank 0 when its share of a handoff is complete, and rank 0 imports the request
once every rank's share and the first token are there. With TP=1 on both sides the one route is
rank 0 to rank 0: the path it always was.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from batonserve.workers.kv_transfer.base import (
    ChannelAddress,
    KVChunk,
    KVSpec,
    KVTransferError,
    KVTransport,
    rank_peer,
)
from batonserve.workers.tp.kv_routes import HeadRoute, head_routes

ReadKV = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Run = tuple[int, int, int]  # (row_start, row_end, first_position)
FOLLOWER_CALL_S = 60.0  # rank 0's bound on a follower's begin or connect call


def send_heads(
    read_kv: ReadKV,
    transport: KVTransport,
    routes: Sequence[HeadRoute],
    own_start: int,
    dst: str,
    handoff_id: int,
    layer: int,
    slots: torch.Tensor,
    runs: Sequence[Run],
) -> int:
    """Read this rank's KV heads at `slots` and queue each route's heads to its rank of `dst`
    (routes all from this rank; `own_start`: its first head). Returns the bytes queued."""
    k, v = read_kv(layer, slots)  # each [n, this rank's heads, head_dim]
    nbytes = 0
    for r in routes:
        a, b = r.start - own_start, r.stop - own_start
        for lo, hi, start in runs:
            kv = torch.stack((k[lo:hi, a:b], v[lo:hi, a:b])).contiguous()
            transport.send(
                rank_peer(dst, r.dst), KVChunk(handoff_id, layer, start, kv, -1, r.start)
            )
            nbytes += kv.numel() * kv.element_size()
    return nbytes


def peer_size(transport: KVTransport, dst: str) -> int:
    """The TP size of worker `dst`: learned when its lanes formed, else asked once (Ray)."""
    if dst not in transport.peer_sizes:
        import ray

        size = 1  # in-process workers (tests) are TP=1
        if ray.is_initialized():
            handle = ray.get_actor(dst, namespace=transport.namespace)
            size = int(_wait([handle.kv_tp_size.remote()], "size")[0])
        transport.peer_sizes[dst] = size
    return transport.peer_sizes[dst]


def _wait(refs: list[Any], what: str) -> list[Any]:
    import ray

    try:
        return list(ray.get(refs, timeout=FOLLOWER_CALL_S)) if refs else []
    except Exception as e:
        raise KVTransferError(f"tensor parallel KV: a rank failed ({what}): {e}") from e


class KVLanes:
    """Rank 0's side of the lanes: peer group sizes, routes, and the followers' shares."""

    def __init__(self, engine: Any, transport: KVTransport, spec: KVSpec) -> None:
        runner: Any = getattr(engine, "runner", None)
        self.runner = runner
        # Only a TP group's follower ranks hold KV heads: an expert-parallel runner has followers
        # too, but its KV lives on rank 0 alone (taking them as lanes failed every EP handoff).
        tp = getattr(runner, "tp_size", 1) > 1
        self.followers: list[Any] = list(runner.followers) if tp else []
        self.size = 1 + len(self.followers)
        self.transport = transport
        self.spec = spec
        self.read_kv: ReadKV = engine.read_kv
        self.heads = self.own_heads(0)
        self.sent = 0  # bytes rank 0 queued itself

    def own_heads(self, rank: int) -> tuple[int, int]:
        """[start, stop) of the KV heads rank `rank` of this group owns."""
        from batonserve.workers.tp.shard import TPShard

        return TPShard(rank, self.size).kv_heads(self.spec.num_kv_heads)

    def routes_to(self, dst: str) -> tuple[HeadRoute, ...]:
        """This group's routes to `dst`."""
        return head_routes(self.spec.num_kv_heads, self.size, peer_size(self.transport, dst))

    def send(
        self, dst: str, handoff_id: int, layer: int, slots: torch.Tensor, runs: list[Run]
    ) -> int:
        """Every rank queues its routes' heads of one layer at `slots`; the bytes of all ranks."""
        routes = self.routes_to(dst)
        cpu = slots.cpu()
        for rank, f in enumerate(self.followers, start=1):
            mine = [r for r in routes if r.src == rank]
            if mine:  # fire and forget: a rank that cannot send reports it (kv_rank_error)
                f.send_share.remote(mine, dst, handoff_id, layer, cpu, runs)
        own = [r for r in routes if r.src == 0]
        self.sent += send_heads(
            self.read_kv, self.transport, own, self.heads[0], dst, handoff_id, layer, slots, runs
        )
        per_head = 2 * self.spec.head_dim * self.spec.torch_dtype.itemsize
        return sum((r.stop - r.start) * (hi - lo) * per_head for r in routes for lo, hi, _ in runs)

    def connect(self, peer: str, addr: ChannelAddress, sender: bool) -> None:
        """Both sides' rank 0 swap TP sizes on the rendezvous store, then every rank joins each
        lane it is on, all at once (each lane's process group forms when both ends join)."""
        timeout = timedelta(seconds=self.transport.cfg.connect_timeout_s)
        store = dist.TCPStore(addr.host, addr.port, 2, False, timeout=timeout)
        key = f"kv/{addr.generation}/tp/"
        store.set(key + ("src" if sender else "dst"), str(self.size))
        other = int(store.get(key + ("dst" if sender else "src")))
        a, b = (self.size, other) if sender else (other, self.size)
        if sender:
            self.transport.peer_sizes[peer] = b
        jobs: list[Any] = []
        errors: list[Exception] = []
        threads: list[threading.Thread] = []
        for r in head_routes(self.spec.num_kv_heads, a, b):
            mine, theirs = (r.src, r.dst) if sender else (r.dst, r.src)
            lane_addr = (
                addr
                if (r.src, r.dst) == (0, 0)
                else dataclasses.replace(addr, lane=f"{r.src}-{r.dst}")
            )
            lane_peer = rank_peer(peer, theirs)
            if mine > 0:
                jobs.append(
                    self.followers[mine - 1].kv_connect.remote(lane_peer, lane_addr, sender)
                )
                continue

            def run(p: str = lane_peer, ad: ChannelAddress = lane_addr) -> None:
                try:
                    self.transport.connect(p, ad, sender)
                except Exception as e:
                    errors.append(e)

            threads.append(threading.Thread(target=run, daemon=True))
        for t in threads:
            t.start()
        _wait(jobs, "connect")
        for t in threads:
            t.join(timeout.total_seconds() + 5)
        if errors or any(t.is_alive() for t in threads):
            raise KVTransferError(f"KV lanes with {peer}: {errors or 'a lane did not form'}")

    def close_peer(self, peer: str) -> None:
        """Drop every rank's lanes with `peer` (a replacement may differ: ask its size anew)."""
        self.transport.peer_sizes.pop(peer, None)
        self.transport.close_peer(peer)
        for f in self.followers:
            f.kv_close_peer.remote(peer)

    def close(self) -> None:
        """The worker shuts down: its follower ranks (and their transports) go now."""
        if self.followers:
            self.runner.close()

    def begin(self, handoff_id: int, prompt_len: int) -> None:
        """Every follower stages its heads of a new import (done before any chunk can come)."""
        _wait([f.begin_share.remote(handoff_id, prompt_len) for f in self.followers], "begin")

    def commit(self, handoff_id: int, slots: torch.Tensor) -> None:
        """Followers write their staged heads at `slots` (confirmed before the next forward)."""
        if self.followers:
            self.runner.commit_shares(handoff_id, slots)

    def drop(self, handoff_id: int) -> None:
        """Followers forget a staged import (aborted, failed or committed)."""
        for f in self.followers:
            f.drop_share.remote(handoff_id)

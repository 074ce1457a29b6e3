"""Served tensor parallelism, the Ray side: a worker actor is rank 0 of a group of N ranks.

The worker actor's engine core (scheduler, sampler) runs once, on rank 0. `build_tp_runner`
starts ranks 1..N-1 as follower actors owned by it (Ray kills them when it dies) in the bundles of
the placement group the controller gang-reserved for the worker (STRICT_PACK by default), hosts
the group's TCPStore and joins them in one torch.distributed group (NCCL on CUDA, gloo on CPU)
whose collectives time out after rank_group.GROUP_TIMEOUT_S. `TPRunner` has ModelRunner's interface: each
forward is sent to every follower first, run here on rank 0's shard (the all-reduces meet the
followers'), then the followers' calls are awaited with a bound, so a dead, failed or silent rank
becomes a TPError that ends the worker; the controller replaces the whole group.

KV: each rank caches its own KV heads; `read_kv`/`write_kv` are rank 0's heads. A KV handoff
moves each rank's heads over that rank's own transport (`workers/tp/kv_lanes.py`): a follower
has a transport of its own, sends the heads rank 0 tells it to, stages what it receives and
writes it when rank 0 commits the import.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.forward_batch import ForwardBatch
from batonserve.workers.handoff_io import StagedKV
from batonserve.workers.kv_transfer import ChannelAddress, KVChunk, KVSpec, make_transport
from batonserve.workers.kv_transfer.config import KVTransferConfig
from batonserve.workers.model_runner import ModelRunner, resolve_device
from batonserve.workers.rank_group import (
    FollowerWatch,
    backend_for,
    cpu_batch,
    host_store,
    join_group,
    lead_group,
    wait_followers,
)
from batonserve.workers.tp.kv_lanes import send_heads
from batonserve.workers.tp.kv_routes import HeadRoute
from batonserve.workers.tp.shard import TPShard


class TPError(RuntimeError):
    """A rank of the tensor-parallel group died, failed or timed out."""


class TPFollower:
    """Rank >= 1: runs rank 0's forwards on its shard; reads and writes its own KV heads."""

    def __init__(
        self, model_dir: str, config: EngineConfig, rank: int, size: int, host: str, port: int
    ) -> None:
        self._store = join_group(backend_for(resolve_device(config.device)), host, port, rank, size)
        self.runner = ModelRunner(model_dir, config, TPShard(rank, size))
        self.rank = rank
        self.heads = self.runner.tp.kv_heads(self.runner.model_config.num_kv_heads)
        self.transport: Any = None  # set by start_kv
        self.worker = ""  # rank 0's actor name: shares and errors are reported to it
        self.namespace = ""
        self._handle: Any = None  # rank 0's actor, found by name on first use
        self.staged: dict[int, StagedKV] = {}  # this rank's heads of imports in progress
        self.lock = threading.Lock()  # chunks land on transport threads
        self.sent = self.received = 0  # bytes this rank's own transport moved

    def start_kv(
        self, worker: str, spec: KVSpec, cfg: KVTransferConfig, host: str, namespace: str
    ) -> None:
        """Open this rank's transport, named rank_peer(worker, rank)."""
        from batonserve.workers.kv_transfer.base import rank_peer

        self.worker, self.namespace, self.spec = worker, namespace, spec
        self.transport = make_transport(
            cfg.transport,
            rank_peer(worker, self.rank),
            spec,
            cfg,
            self._on_chunk,
            self._on_error,
            host=host,
            namespace=namespace,
            device=str(self.runner.device),
        )

    def kv_connect(self, peer: str, addr: ChannelAddress, sender: bool) -> None:
        """Join one lane (rank 0 calls this while the peer's rank joins the other end)."""
        self.transport.connect(peer, addr, sender)

    def kv_close_peer(self, peer: str) -> None:
        """Drop this rank's lanes with worker `peer`."""
        self.transport.close_peer(peer)

    def kv_push(self, peer: str, meta: KVChunk, kv: torch.Tensor | None) -> None:
        """Object-store transport: a chunk for this rank (Ray fetched its tensor here)."""
        self.transport.push(peer, dataclasses.replace(meta, kv=kv))

    def send_share(
        self,
        routes: list[HeadRoute],
        dst: str,
        handoff_id: int,
        layer: int,
        slots: torch.Tensor,
        runs: list[tuple[int, int, int]],
    ) -> None:
        """Queue this rank's `routes` of one layer (rank 0 calls this from its layer hook)."""
        try:
            nbytes = send_heads(
                self.runner.read_kv,
                self.transport,
                routes,
                self.heads[0],
                dst,
                handoff_id,
                layer,
                slots,
                runs,
            )
        except Exception as e:
            self._on_error(dst, e)
            return
        with self.lock:
            self.sent += nbytes

    def begin_share(self, handoff_id: int, prompt_len: int) -> None:
        """Stage this rank's heads of a new import."""
        staged = StagedKV(self.spec, prompt_len, self.heads, self.runner.device)
        with self.lock:
            self.staged[handoff_id] = staged

    def write_share(self, handoff_id: int, slots: torch.Tensor) -> None:
        """Rank 0 imported the request at `slots`: write this rank's staged heads there."""
        with self.lock:
            staged = self.staged.pop(handoff_id)
        for layer in range(staged.buf.shape[0]):
            self.runner.write_kv(layer, slots, staged.buf[layer, 0], staged.buf[layer, 1])

    def drop_share(self, handoff_id: int) -> None:
        """Forget a staged import (aborted or failed)."""
        with self.lock:
            self.staged.pop(handoff_id, None)

    def kv_bytes(self) -> tuple[int, int]:
        """(sent, received) bytes of KV this rank's transport moved."""
        return self.sent, self.received

    def _on_chunk(self, peer: str, chunk: KVChunk) -> None:
        with self.lock:
            staged = self.staged.get(chunk.handoff_id)
            if staged is None or chunk.kv is None:
                return  # an aborted attempt: dropped
            staged.add(chunk)
            self.received += chunk.kv.numel() * chunk.kv.element_size()
            if not staged.full:
                return
        self._rank0().kv_rank_done.remote(chunk.handoff_id, self.rank)

    def _on_error(self, peer: str, err: Exception) -> None:
        from batonserve.workers.kv_transfer.base import split_peer

        self._rank0().kv_rank_error.remote(split_peer(peer)[0], str(err))

    def _rank0(self) -> Any:
        import ray

        if self._handle is None:
            self._handle = ray.get_actor(self.worker, namespace=self.namespace)
        return self._handle

    def ready(self) -> tuple[int, int]:
        """(KV block count, resident parameter bytes) of this rank."""
        return self.runner.num_blocks, self.runner.parameter_bytes()

    def execute(self, batch: ForwardBatch) -> None:
        """This rank's share of one forward (the logits are gathered on every rank; dropped)."""
        self.runner.execute(batch)


class _AfterReduce:
    """Calls the engine's layer hook for layer i - 1 when rank 0 reaches layer i: by then the
    all-reduces of layer i - 1 are done, so every rank has written that layer's KV."""

    def __init__(self, hook: Callable[[int], None]) -> None:
        self.hook = hook

    def __call__(self, layer: int) -> None:
        if layer > 0:
            self.hook(layer - 1)


class TPRunner:
    """Rank 0's runner: ModelRunner's interface, every forward run on all ranks of the group."""

    def __init__(
        self, local: ModelRunner, followers: list[Any], store: Any, follower_bytes: list[int]
    ) -> None:
        self.local = local
        self.followers = followers
        self._watch = FollowerWatch(followers)
        self.store = store  # the group's TCPStore: it must live as long as the group
        self.tp_size = 1 + len(followers)
        self.rank_bytes = [local.parameter_bytes(), *follower_bytes]  # resident, per rank
        self.model_config = local.model_config
        self.num_blocks = local.num_blocks
        self.block_size = local.block_size
        self.device = local.device
        self.dtype = local.dtype
        self.model_dir = local.model_dir
        self.token_paths = None
        self.expert_store = local.expert_store  # rank 0's slice store: its stats are the group's
        self._pending: list[Any] = []  # follower KV writes not yet confirmed

    def execute(
        self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Send the batch to every follower, run it here, then wait (bounded) for them."""
        self._wait(self._pending, "KV write")  # a follower actor is threaded: writes land first
        self._pending = []
        cpu = cpu_batch(batch)
        refs = [f.execute.remote(cpu) for f in self.followers]
        hook = None if layer_hook is None else _AfterReduce(layer_hook)
        try:
            logits = self.local.execute(batch, hook)
        except RuntimeError as e:  # a collective failed or timed out: a rank died
            self._wait(refs, "forward")  # names the follower's own error when it has one
            raise TPError(f"tensor parallel: the group failed during a forward: {e}") from e
        if layer_hook is not None:  # the logits all-gather is done: every rank is past the end
            layer_hook(self.model_config.num_layers - 1)
        self._wait(refs, "forward")
        return logits

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0's KV heads at `slots`, each [n, its heads, d] (each rank sends its own)."""
        return self.local.read_kv(layer, slots)

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write rank 0's KV heads [n, its heads, d] at `slots`."""
        self.local.write_kv(layer, slots, k, v)

    def start_kv(
        self, worker: str, spec: KVSpec, cfg: KVTransferConfig, host: str, namespace: str
    ) -> None:
        """Open every follower's own KV transport (the worker's is rank 0's)."""
        refs = [f.start_kv.remote(worker, spec, cfg, host, namespace) for f in self.followers]
        self._wait(refs, "KV transport start")

    def commit_shares(self, handoff_id: int, slots: torch.Tensor) -> None:
        """Every follower writes its staged heads of an import at `slots` (confirmed before the
        next forward)."""
        s = slots.cpu()
        self._pending += [f.write_share.remote(handoff_id, s) for f in self.followers]

    def close(self) -> None:
        """Stop the follower ranks now (they would die with this actor, a moment later)."""
        import ray

        for f in self.followers:
            ray.kill(f, no_restart=True)

    def check_followers(self) -> None:
        """TPError once a follower rank is found dead (checked between steps)."""
        self._watch.check(TPError, "tensor parallel")

    def _get(self, refs: list[Any], what: str) -> list[Any]:
        return wait_followers(refs, what, TPError, "tensor parallel")

    def _wait(self, refs: list[Any], what: str) -> None:
        self._get(refs, what)


def build_tp_runner(
    model_dir: Path, config: EngineConfig, size: int, name: str = "", namespace: str | None = None
) -> TPRunner:
    """Inside the worker actor: start ranks 1..size-1, form the group, build rank 0's shard.

    Followers go into bundles 1.. of the actor's placement group (the controller reserved one
    bundle per rank); without one, onto this node. They are named `<name>-tp<rank>-<random>`.
    """
    import ray
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    if not ray.is_initialized():
        raise ValueError(
            f"tensor_parallel_size: {size} needs a Ray worker actor (batonserve serve)"
        )
    device = resolve_device(config.device)
    backend = backend_for(device)
    ctx = ray.get_runtime_context()
    store = host_store(size)
    assigned = ctx.get_assigned_resources()
    pg = ray.util.get_current_placement_group()
    remote: Any = ray.remote(TPFollower)
    tag = uuid.uuid4().hex[:8]
    followers = []
    for r in range(1, size):
        strategy: Any = (
            PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
            if pg is not None
            else NodeAffinitySchedulingStrategy(node_id=ctx.get_node_id(), soft=False)
        )
        opts: dict[str, Any] = {
            "num_cpus": assigned.get("CPU", 0) if pg is not None else 0,
            "num_gpus": assigned.get("GPU", 0),
            "max_restarts": 0,
            # A handoff's sends, lane rendezvous and writes run beside a forward.
            "max_concurrency": 4,
            "scheduling_strategy": strategy,
        }
        if name:
            opts.update(name=f"{name}-tp{r}-{tag}", namespace=namespace)
        followers.append(
            remote.options(**opts).remote(str(model_dir), config, r, size, store.host, store.port)
        )
    local, ready = lead_group(
        backend, store, followers, lambda: ModelRunner(model_dir, config, TPShard(0, size))
    )
    assert all(n == local.num_blocks for n, _ in ready), "ranks sized their KV cache differently"
    return TPRunner(local, followers, store, [b for _, b in ready])

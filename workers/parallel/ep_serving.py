"""Served expert parallelism, the Ray side: a worker actor leads a group of N processes.

The leader (the worker actor's engine) starts N-1 follower actors on its own node, owned by it
(Ray kills them when it dies), hosts the group's TCPStore and joins them in one torch.distributed
group (gloo on CPU, NCCL on CUDA). Every rank holds the full model minus the experts it does not
own (it never reads them: the runner loads no expert, `_load_owned_experts` reads the rank's
slice), and a full-size KV cache. `EPRunner` wraps the leader's ModelRunner: each forward is sent to
every follower first (not awaited), run locally, then the followers' calls are awaited with a
bound, so a dead or silent follower becomes an exception that ends the worker (the controller
replaces it, with fresh followers). KV written by a handoff import is written on every rank.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.disk import DiskTier
from batonserve.workers.expert_store.types import ExpertKey
from batonserve.workers.forward_batch import ForwardBatch
from batonserve.workers.model_runner import ModelRunner, resolve_device
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.parallel.ep_slice import (
    SlicedEPMoE,
    check_expert_parallel,
    shard_experts,
    tuner_stats,
)
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.rank_group import (
    FollowerWatch,
    backend_for,
    cpu_batch,
    host_store,
    join_group,
    lead_group,
    wait_followers,
)


class ExpertParallelError(RuntimeError):
    """A follower of the expert-parallel group died, failed or timed out."""


def _build_rank(model_dir: Path, config: EngineConfig) -> tuple[ModelRunner, list[SlicedEPMoE]]:
    """This rank's runner: non-expert weights loaded (experts left out), every MoE layer cut to
    this rank's shard, then only this rank's experts read from the checkpoint."""
    runner = ModelRunner(model_dir, config)
    with torch.inference_mode():
        blocks = shard_experts(runner.model)
        _load_owned_experts(runner, blocks)
    return runner, blocks


def _load_owned_experts(runner: ModelRunner, blocks: list[SlicedEPMoE]) -> None:
    """Fill each shard's expert slice [E/W, ...] expert by expert from the safetensors files."""
    dtype_name = str(runner.dtype).removeprefix("torch.")
    disk = DiskTier(runner.model_dir, dtype_name)
    try:
        # Checkpoint names count decoder layers; Qwen2-MoE may keep some of them dense.
        sharded = [i for i, layer in enumerate(runner.model.layers) if layer.mlp in blocks]
        for layer, block in zip(sharded, blocks, strict=True):
            ep = block.ep
            mine = ep.shape.experts_of(ep.shape.rank)
            gu = torch.empty(ep.w_gate_up.shape, dtype=runner.dtype, device=runner.device)
            down = torch.empty(ep.w_down.shape, dtype=runner.dtype, device=runner.device)
            for i, e in enumerate(mine):
                w = disk.read(ExpertKey(layer, e))
                gu[i].copy_(w.w_gate_up)
                down[i].copy_(w.w_down)
            ep.w_gate_up = torch.nn.Parameter(gu, requires_grad=False)
            ep.w_down = torch.nn.Parameter(down, requires_grad=False)
    finally:
        disk.close()


class EPFollower:
    """Rank >= 1 of an expert-parallel group: replays the leader's forwards and KV writes."""

    def __init__(
        self, model_dir: str, config: EngineConfig, rank: int, world: int, host: str, port: int
    ) -> None:
        backend = backend_for(resolve_device(config.device))
        self._store = join_group(backend, host, port, rank, world)
        self.runner, self.blocks = _build_rank(Path(model_dir), config)

    def ready(self) -> int:
        """The KV block count (must equal the leader's)."""
        return self.runner.num_blocks

    def execute(self, batch: ForwardBatch) -> None:
        """This rank's share of one forward (its logits are the leader's; dropped)."""
        self.runner.execute(batch)

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Mirror a KV handoff import."""
        self.runner.write_kv(layer, slots, k, v)


class EPRunner:
    """The leader's runner: ModelRunner's interface, every forward mirrored on the followers."""

    def __init__(
        self, local: ModelRunner, blocks: list[SlicedEPMoE], followers: list[Any], store: Any
    ) -> None:
        self.local = local
        self.store = store  # the group's TCPStore: it must live as long as the group
        self.blocks = blocks
        self.followers = followers
        self._watch = FollowerWatch(followers)
        self.model_config = local.model_config
        self.num_blocks = local.num_blocks
        self.block_size = local.block_size
        self.device = local.device
        self.dtype = local.dtype
        self.model_dir = local.model_dir
        self.token_paths = local.token_paths
        self.expert_store = None
        self._pending: list[Any] = []  # follower KV writes not yet confirmed

    def execute(
        self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Send the batch to every follower, run it here, then wait (bounded) for them."""
        cpu = cpu_batch(batch)
        refs = [f.execute.remote(cpu) for f in self.followers]
        try:
            logits = self.local.execute(batch, layer_hook)
        except RuntimeError as e:  # a collective failed: a peer died or the group broke
            raise ExpertParallelError(
                f"expert parallel: the group failed during a forward (a follower died?): {e}"
            ) from e
        self._wait(self._pending + refs, "forward")
        self._pending = []
        return logits

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local: every rank holds the same KV."""
        return self.local.read_kv(layer, slots)

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write here and on every follower (confirmed with the next forward; Ray keeps order)."""
        self.local.write_kv(layer, slots, k, v)
        s, kc, vc = slots.cpu(), k.cpu(), v.cpu()
        self._pending += [f.write_kv.remote(layer, s, kc, vc) for f in self.followers]

    def tuner_stats(self) -> EPTunerStats | None:
        """A copy of the overlap tuner's choices (first MoE layer)."""
        # A deep copy: the step thread keeps tuning while the stats are pickled elsewhere.
        return copy.deepcopy(tuner_stats(self.blocks))

    def check_followers(self) -> None:
        """ExpertParallelError once a follower rank is found dead (checked between steps)."""
        self._watch.check(ExpertParallelError, "expert parallel")

    def _wait(self, refs: list[Any], what: str) -> None:
        wait_followers(refs, what, ExpertParallelError, "expert parallel")


def build_ep_runner(
    model_dir: Path, config: EngineConfig, name: str = "", namespace: str | None = None
) -> EPRunner:
    """Inside a Ray actor: start the followers on this node, form the group, build rank 0.

    Followers are named `<name>-ep<rank>-<random>` in `namespace` when a name is given (operators
    and tests find them; the suffix keeps a replacement's names free of its predecessor's).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    n = config.expert_parallel_size
    mc = ModelConfig.from_dir(model_dir)
    check_expert_parallel(config, mc, model_dir.name)
    if not ray.is_initialized():
        raise ValueError(
            f"expert_parallel_size: {n} needs a Ray worker actor (run it with `batonserve serve`)"
        )
    device = resolve_device(config.device)
    backend = backend_for(device)
    ctx = ray.get_runtime_context()
    store = host_store(n)
    gpus = len(ray.get_gpu_ids()) if device.type == "cuda" else 0
    base: dict[str, Any] = {
        "num_cpus": 0,
        "num_gpus": gpus,
        "max_restarts": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            node_id=ctx.get_node_id(), soft=False
        ),
    }
    remote: Any = ray.remote(EPFollower)
    tag = uuid.uuid4().hex[:8]
    followers = []
    for r in range(1, n):
        opts = dict(base, name=f"{name}-ep{r}-{tag}", namespace=namespace) if name else base
        followers.append(
            remote.options(**opts).remote(str(model_dir), config, r, n, store.host, store.port)
        )
    (local, blocks), sizes = lead_group(
        backend, store, followers, lambda: _build_rank(model_dir, config)
    )
    assert all(s == local.num_blocks for s in sizes), "followers sized their KV cache differently"
    return EPRunner(local, blocks, followers, store)

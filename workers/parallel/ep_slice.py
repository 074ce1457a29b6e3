"""Served expert parallelism, the model side: replicated attention, token-sliced sharded experts.

Every rank of the group runs the same batch through the same (replicated) attention, so all ranks
hold the identical hidden state [T, D] before each MoE layer. `SlicedEPMoE` gives rank r the
contiguous rows of its slice, runs `ExpertParallelMoE` on them (all-to-all to the expert owners
and back), then all-gathers the slices so every rank continues with the identical [T, D] output.
Nothing here knows of Ray; `ep_serving.py` builds the group among actors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from batonserve.workers.config import EngineConfig
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.parallel.ep_tuner import EPSettings, EPTuner, EPTunerStats
from batonserve.workers.parallel.expert_parallel import ExpertParallelMoE, expert_parallel_of

# Overlap degrees the online tuner tries per token bucket (outputs do not depend on the choice).
TUNER_CANDIDATES = (EPSettings(1), EPSettings(2), EPSettings(4))


def check_expert_parallel(config: EngineConfig, model: ModelConfig, name: str = "") -> None:
    """ValueError naming the field when `expert_parallel_size` cannot serve this model."""
    n = config.expert_parallel_size
    if n == 1:
        return
    label = f"model {name!r}" if name else "the model"
    if not model.is_moe:
        raise ValueError(
            f"expert_parallel_size: {n} needs a MoE model, but {label} has no MoE layers; "
            "leave it at 1"
        )
    experts = int(model.num_local_experts)
    if experts % n:
        raise ValueError(
            f"expert_parallel_size: {n} must divide the number of experts of {label} ({experts})"
        )


def slice_of(num_rows: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous rows; the first num_rows % world ranks get one more."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class SlicedEPMoE(nn.Module):
    """One MoE layer over replicated activations: slice rows, EP forward, all-gather the rows."""

    def __init__(self, ep: ExpertParallelMoE, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.ep = ep
        self.group = group
        self.world = ep.shape.world_size
        self.rank = ep.shape.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] (identical on every rank) -> [T, D] (identical on every rank)."""
        t = int(x.shape[0])
        start, stop = slice_of(t, self.world, self.rank)
        mine = self.ep(x[start:stop])  # [stop - start, D]; 0 rows is fine
        if self.world == 1:
            return mine
        width = -(-t // self.world)  # all_gather wants equal sizes: pad every slice to the widest
        buf = x.new_zeros(width, x.shape[1])
        buf[: stop - start] = mine
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf, group=self.group)
        rows = [parts[r][: b - a] for r, (a, b) in enumerate(self._slices(t))]
        return torch.cat(rows)

    def _slices(self, t: int) -> list[tuple[int, int]]:
        return [slice_of(t, self.world, r) for r in range(self.world)]


def shard_experts(
    model: nn.Module, group: dist.ProcessGroup | None = None, tune: bool = True
) -> list[SlicedEPMoE]:
    """Swap every SparseMoE of a loaded model for its sliced expert-parallel shard on this rank.

    Each layer gets its own tuner (a shared one would mix the layers' times); all ranks see the
    same times, so they pick the same settings without a message.
    """
    from batonserve.workers.models.layers import SparseMoE

    blocks: list[SlicedEPMoE] = []
    for layer in model.layers:  # type: ignore[union-attr]
        moe = layer.mlp
        if not isinstance(moe, SparseMoE):
            continue
        tuner = EPTuner(TUNER_CANDIDATES) if tune else None
        ep = expert_parallel_of(moe, group, tuner)
        layer.mlp = SlicedEPMoE(ep, group)
        blocks.append(layer.mlp)
    if not blocks:
        raise ValueError("expert_parallel_size: the model has no sparse MoE layers to shard")
    return blocks


def tuner_stats(blocks: list[SlicedEPMoE]) -> EPTunerStats | None:
    """The first MoE layer's tuner stats (every layer tunes alike on the same token buckets)."""
    tuner = blocks[0].ep.tuner if blocks else None
    return tuner.stats if tuner is not None else None

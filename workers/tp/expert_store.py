"""The tiered expert store under tensor parallelism: one store per rank, holding its slices.

Each rank's store holds its share of every expert it keeps (rows [i0, i1) of gate and up, columns
of down: the same split as the sharded model), read with `get_slice` from the checkpoint, under a
per-rank byte budget. Routing is computed from the all-reduced hidden state, so it is identical on
every rank, and the store's policies are deterministic functions of the demand sequence: every
rank keeps, evicts and misses the same experts in the same step. A miss is a local read, never a
collective, so a slow rank only delays the layer's all-reduce; it cannot deadlock it.

Background prefetch is off under TP: when a prefetch lands depends on each rank's timing, so the
ranks' residency would drift apart (the predictor's forecasts still steer the policy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from batonserve.workers.tp.shard import TPShard

if TYPE_CHECKING:
    from batonserve.workers.expert_store import ExpertStore
    from batonserve.workers.expert_store.types import ExpertKey

Residency = tuple[tuple["ExpertKey", ...], tuple[int, ...], tuple[int, ...]]


def rank_expert_slice(model: nn.Module, tp: TPShard) -> tuple[int, int] | None:
    """[start, stop) of the experts' intermediate width this rank's model holds (None: no TP)."""
    if tp.size == 1:
        return None
    from batonserve.workers.expert_store.moe_block import sparse_moe_layers

    moe = sparse_moe_layers(model)[0][1]
    return moe.i0, moe.i0 + moe.inter


def prefetch_under_tp(tp: TPShard, wanted: bool) -> bool:
    """Whether background prefetch runs: never under TP (it would break rank agreement)."""
    if wanted and tp.size > 1:
        print(
            f"expert_prefetch: off under tensor_parallel_size {tp.size} (ranks must keep the "
            "same experts; forecasts still steer the cache policy)",
            flush=True,
        )
    return wanted and tp.size == 1


def residency(store: ExpertStore) -> Residency:
    """(resident experts, per-expert hits, per-expert misses) of one rank's store."""
    st = store.stats
    return (
        tuple(sorted(store.fast.entries)),
        tuple(n for row in st.expert_hits for n in row),
        tuple(n for row in st.expert_misses for n in row),
    )


def check_same_residency(store: ExpertStore, tp: TPShard) -> None:
    """RuntimeError unless every rank's store holds, hit and missed the same experts.

    A collective: every rank of the group must call it at the same point. Tensors, not pickled
    objects, cross the group (first each rank's length, then the contents).
    """
    if tp.size == 1:
        return
    keys, hits, misses = residency(store)
    mine = torch.tensor(
        [len(keys), *(n for key in keys for n in key), *hits, *misses], dtype=torch.int64
    )
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(tp.size)]
    dist.all_gather(sizes, torch.tensor([mine.numel()]), group=tp.group)
    if all(int(n) == mine.numel() for n in sizes):
        every = [torch.empty_like(mine) for _ in range(tp.size)]
        dist.all_gather(every, mine, group=tp.group)
        differ = [r for r, other in enumerate(every) if not torch.equal(other, mine)]
    else:
        differ = [r for r, n in enumerate(sizes) if int(n) != mine.numel()]
    if differ:
        raise RuntimeError(
            f"expert store: rank {tp.rank}'s residency differs from rank(s) {differ} "
            "(the ranks must make the same cache decisions)"
        )

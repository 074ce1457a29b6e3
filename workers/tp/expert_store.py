"""The tiered expert store under tensor parallelism: one store per rank, holding its slices.

Each rank's store holds its share of every expert it keeps (rows [i0, i1) of gate and up, columns
of down: the same split as the sharded model), read with `get_slice` from the checkpoint, under a
per-rank byte budget. Routing is computed from the all-reduced hidden state, so it is identical on
every rank, and the store's policies are deterministic functions of the demand sequence: every
rank keeps, evicts and misses the same experts in the same step. A miss is a local read, never a
collective, so a slow rank only delays the layer's all-reduce; it cannot deadlock it.

Prefetch runs in lockstep under TP (StoreConfig.prefetch_lockstep, planned_reads.py): every rank
forecasts from the same all-reduced hidden state, plans the same prefetches at the same point of the
forward (after a layer's demand loads) and waits for those reads before the forecast layer runs, so
only each rank's read time differs, never what it holds.
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

# (resident experts, per-expert hits, per-expert misses, prefetches (issued, used, dropped))
Residency = tuple[tuple["ExpertKey", ...], tuple[int, ...], tuple[int, ...], tuple[int, int, int]]


def rank_expert_slice(model: nn.Module, tp: TPShard) -> tuple[int, int] | None:
    """[start, stop) of the experts' intermediate width this rank's model holds (None: no TP)."""
    if tp.size == 1:
        return None
    from batonserve.workers.expert_store.moe_block import sparse_moe_layers

    moe = sparse_moe_layers(model)[0][1]
    return moe.i0, moe.i0 + moe.inter


def residency(store: ExpertStore) -> Residency:
    """What every rank's store must agree on: resident experts, hits, misses and prefetches."""
    st = store.stats
    return (
        tuple(sorted(store.fast.entries)),
        tuple(n for row in st.expert_hits for n in row),
        tuple(n for row in st.expert_misses for n in row),
        (st.prefetch_issued, st.prefetch_used, st.prefetch_dropped),
    )


def check_same_residency(store: ExpertStore, tp: TPShard) -> None:
    """RuntimeError unless every rank's store holds, hit, missed and prefetched the same experts.

    A collective: every rank of the group must call it at the same point. Tensors, not pickled
    objects, cross the group (first each rank's length, then the contents).
    """
    if tp.size == 1:
        return
    keys, hits, misses, prefetch = residency(store)
    flat = [len(keys), *(n for key in keys for n in key), *hits, *misses, *prefetch]
    mine = torch.tensor(flat, dtype=torch.int64)
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

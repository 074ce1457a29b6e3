"""Offline replay of a demand trace through a cache policy (Belady's ceiling, cross-checks).

Uses the store's own CacheTier and policies, without loading anything: every miss is loaded on
demand (and inserted if the policy admits it), nothing is prefetched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batonserve.workers.expert_store.cache import CacheTier
from batonserve.workers.expert_store.policies import PolicyContext, make_policy
from batonserve.workers.expert_store.types import ExpertKey, ExpertWeights, TierStats


def demand_sequence(ids_per_forward: Sequence[Sequence[torch.Tensor]]) -> list[ExpertKey]:
    """The store's demand order: per forward, per layer, the distinct experts ascending."""
    seq: list[ExpertKey] = []
    for layers in ids_per_forward:
        for layer, ids in enumerate(layers):
            seq += [ExpertKey(layer, int(e)) for e in torch.unique(ids).tolist()]
    return seq


@dataclass(frozen=True)
class SimResult:
    """Hits and accesses counted from `count_from` on."""

    hits: int
    accesses: int

    @property
    def hit_rate(self) -> float:
        """hits / accesses."""
        return self.hits / self.accesses if self.accesses else 0.0


def simulate(
    seq: Sequence[ExpertKey],
    capacity_experts: int,
    policy: str,
    ctx: PolicyContext,
    count_from: int = 0,
    group_ends: Sequence[int] = (),
) -> SimResult:
    """Replay `seq` through a tier holding `capacity_experts` equal-size experts.

    `group_ends`: indices where a layer's demand group ends; experts of the current group are
    protected from eviction like in the store (default: each access is its own group).
    """
    if policy == "belady":
        ctx = PolicyContext(ctx.num_layers, ctx.num_experts, ctx.popularity, tuple(seq))
    unit = ExpertWeights(torch.empty(1, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8))
    tier = CacheTier(capacity_experts * unit.nbytes, make_policy(policy, ctx), TierStats())
    ends = sorted(group_ends)
    hits = accesses = 0
    g_start, gi = 0, 0
    for i, key in enumerate(seq):
        while gi < len(ends) and ends[gi] <= i:
            g_start, gi = ends[gi], gi + 1
        g_end = ends[gi] if gi < len(ends) else i + 1
        protect = set(seq[g_start:g_end]) if ends else {key}
        hit = key in tier
        tier.policy.on_access(key, i)
        if not hit:
            tier.insert(key, unit, i, protect - {key}, prefetch=False)
        if i >= count_from:
            accesses += 1
            hits += int(hit)
    return SimResult(hits, accesses)


def group_ends_of(ids_per_forward: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    """End index (exclusive) of each (forward, layer) group in `demand_sequence` order."""
    ends: list[int] = []
    n = 0
    for layers in ids_per_forward:
        for ids in layers:
            n += int(torch.unique(ids).numel())
            ends.append(n)
    return ends

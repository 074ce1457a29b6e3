"""Belady's optimal replacement (offline): evict the expert whose next demand is furthest away.

It needs the whole future demand sequence, so it runs on a recorded trace; with bypass (a missed
expert whose next use is further than every resident's is not inserted) it is the optimal demand
policy for equal-size items, the ceiling the online policies are measured against.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection

from batonserve.workers.expert_store.policies.base import (
    INF,
    CachePolicy,
    PolicyContext,
)
from batonserve.workers.expert_store.types import ExpertKey


class BeladyPolicy(CachePolicy):
    """Furthest next use first, from the known future."""

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        if ctx.future is None:
            raise ValueError("policy: 'belady' needs the demand trace (PolicyContext.future)")
        self.positions: dict[ExpertKey, list[int]] = {}
        for i, key in enumerate(ctx.future):
            self.positions.setdefault(ExpertKey(*key), []).append(i)

    def next_use(self, key: ExpertKey, now: int) -> float:
        """Index of the first demand of `key` after `now` (inf if never)."""
        pos = self.positions.get(key)
        if not pos:
            return INF
        i = bisect.bisect_right(pos, now)
        return float(pos[i]) if i < len(pos) else INF

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Nothing to track: the future is known."""

    def victim(self, candidates: Collection[ExpertKey], now: int) -> ExpertKey:
        """The candidate used furthest in the future (ties: smallest key, deterministic)."""
        return max(sorted(candidates), key=lambda k: self.next_use(k, now))

    def admit(self, key: ExpertKey, victim: ExpertKey, now: int, prefetch: bool) -> bool:
        """Insert only if `key` is needed before `victim` (else bypass)."""
        return self.next_use(key, now) < self.next_use(victim, now)

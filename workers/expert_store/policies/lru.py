"""LRU: evict the expert whose last demand is oldest."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection

from batonserve.workers.expert_store.policies.base import (
    CachePolicy,
    PolicyContext,
)
from batonserve.workers.expert_store.types import ExpertKey


class Recency:
    """Keys in order of last touch (oldest first); shared by policies that break ties by age."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()

    def touch(self, key: ExpertKey) -> None:
        """Mark `key` most recent."""
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: ExpertKey) -> None:
        """Drop `key` from the order."""
        self._order.pop(key, None)

    def oldest(self, candidates: Collection[ExpertKey]) -> ExpertKey:
        """The least recently touched of `candidates` (never-touched ones first)."""
        cands = set(candidates)
        untouched = sorted(k for k in cands if k not in self._order)
        if untouched:
            return untouched[0]
        for key in self._order:
            if key in cands:
                return key
        raise AssertionError("victim() called with no candidates")


class LRUPolicy(CachePolicy):
    """Least recently used."""

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.recency = Recency()

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Refresh the key's recency."""
        self.recency.touch(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """A loaded key counts as just used."""
        self.recency.touch(key)

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the evicted key."""
        self.recency.forget(key)

    def victim(self, candidates: Collection[ExpertKey], now: int) -> ExpertKey:
        """The least recently used candidate."""
        return self.recency.oldest(candidates)

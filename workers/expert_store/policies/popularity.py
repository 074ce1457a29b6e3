"""Static popularity: keep the experts a routing trace used most; unpopular misses bypass the tier."""

from __future__ import annotations

from collections.abc import Collection

from batonserve.workers.expert_store.policies.base import (
    CachePolicy,
    PolicyContext,
)
from batonserve.workers.expert_store.policies.lru import Recency
from batonserve.workers.expert_store.types import ExpertKey


class PopularityPolicy(CachePolicy):
    """Evict the least popular expert (trace counts); admit only a more popular one."""

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        if ctx.popularity is None:
            raise ValueError("policy: 'popularity' needs routing counts (PolicyContext.popularity)")
        self.counts = ctx.popularity
        self.recency = Recency()

    def score(self, key: ExpertKey) -> int:
        """The expert's routed-token count in the trace."""
        return self.counts[key.layer][key.expert]

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Recency only breaks ties."""
        self.recency.touch(key)

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the evicted key."""
        self.recency.forget(key)

    def victim(self, candidates: Collection[ExpertKey], now: int) -> ExpertKey:
        """The least popular candidate (oldest first among equals)."""
        low = min(self.score(k) for k in candidates)
        return self.recency.oldest([k for k in candidates if self.score(k) == low])

    def admit(self, key: ExpertKey, victim: ExpertKey, now: int, prefetch: bool) -> bool:
        """Only a strictly more popular expert displaces a resident one (the tier stays static)."""
        return self.score(key) > self.score(victim)

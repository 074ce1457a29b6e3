"""Predictive: Belady's rule on the predictor's forecasts (evict the furthest predicted use).

Experts with no live forecast are evicted first, least recently used first; a prefetch only displaces
an expert whose forecast use is later than its own, so prefetch never pushes out what the next
layers need.
"""

from __future__ import annotations

from collections.abc import Collection

from batonserve.workers.expert_store.policies.base import (
    INF,
    CachePolicy,
    PolicyContext,
)
from batonserve.workers.expert_store.policies.lru import Recency
from batonserve.workers.expert_store.types import ExpertKey


class PredictivePolicy(CachePolicy):
    """Forecast-driven eviction and prefetch admission."""

    def __init__(self, ctx: PolicyContext) -> None:
        super().__init__(ctx)
        self.recency = Recency()
        self.tick = 0
        self._by_tick: dict[int, frozenset[ExpertKey]] = {}  # layer tick -> keys forecast there

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Refresh recency (the tie-breaker)."""
        self.recency.touch(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """A loaded key counts as just used."""
        self.recency.touch(key)

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the evicted key."""
        self.recency.forget(key)

    def advance(self, tick: int) -> None:
        """Drop forecasts for ticks that have passed."""
        self.tick = tick
        for t in [t for t in self._by_tick if t < tick]:
            del self._by_tick[t]

    def forecast(self, tick: int, keys: Collection[ExpertKey]) -> None:
        """Replace the forecast for layer tick `tick` (a later forecast is better informed)."""
        if tick >= self.tick:
            self._by_tick[tick] = frozenset(keys)

    def predicted_use(self, key: ExpertKey) -> float:
        """The earliest live forecast tick of `key` (inf if none)."""
        ticks = [t for t, keys in self._by_tick.items() if key in keys]
        return float(min(ticks)) if ticks else INF

    def victim(self, candidates: Collection[ExpertKey], now: int) -> ExpertKey:
        """Unforecast experts first (LRU among them), else the furthest forecast."""
        uses = {k: self.predicted_use(k) for k in candidates}
        far = max(uses.values())
        return self.recency.oldest([k for k, u in uses.items() if u == far])

    def admit(self, key: ExpertKey, victim: ExpertKey, now: int, prefetch: bool) -> bool:
        """Enter only in place of an expert forecast later than this one's next use.

        A demand-loaded expert is used now (it bypasses the tier when refused); its next use is
        at the earliest the same layer of the next forward, unless a forecast says sooner.
        """
        mine = self.predicted_use(key)
        if not prefetch:
            mine = min(mine, float(self.tick + self.ctx.num_layers))
        return mine < self.predicted_use(victim)

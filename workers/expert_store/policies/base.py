"""The cache-policy interface of the expert store's fast tier, and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass

from batonserve.workers.expert_store.types import ExpertKey

INF = float("inf")


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may be built from: model shape, popularity counts, the future (offline)."""

    num_layers: int
    num_experts: int
    popularity: tuple[tuple[int, ...], ...] | None = None  # [layer][expert] counts from a trace
    future: tuple[ExpertKey, ...] | None = None  # the whole demand sequence (Belady only)


class CachePolicy(ABC):
    """Chooses what the fast tier evicts and admits. Times: `now` = index of the demand access."""

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def on_access(self, key: ExpertKey, now: int) -> None:
        """A demand access (hit or miss) to `key`, the `now`-th demand of the run."""

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """`key` entered the tier."""
        return None

    def on_evict(self, key: ExpertKey) -> None:
        """`key` left the tier."""
        return None

    @abstractmethod
    def victim(self, candidates: Collection[ExpertKey], now: int) -> ExpertKey:
        """The candidate to evict next (candidates is never empty)."""

    def admit(self, key: ExpertKey, victim: ExpertKey, now: int, prefetch: bool) -> bool:
        """Whether `key` may replace `victim` (default: always)."""
        return True

    def forecast(self, tick: int, keys: Collection[ExpertKey]) -> None:
        """Forecast: `keys` used at layer tick `tick` (ignored by default)."""
        return None

    def advance(self, tick: int) -> None:
        """A new layer tick begins (ignored by default)."""
        return None

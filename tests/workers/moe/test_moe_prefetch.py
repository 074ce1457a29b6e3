"""Prefetch: demand loads are never queued behind it, the bandwidth budget holds, stats add up."""

from __future__ import annotations

import time
from typing import Any

from moe_helpers import PROMPTS, ResidentRun, same_logits, store_run

from batonserve.workers.expert_store import ExpertKey, ExpertStore, StoreConfig
from batonserve.workers.expert_store.disk import DiskTier
from batonserve.workers.models.paths import resolve_model_dir

READ_S = 0.05
EXPERT_BYTES = 3 * 256 * 64 * 2


class SlowDisk(DiskTier):
    """A disk tier whose every read takes READ_S (a slow device); `started` lists reads in order."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.started: list[ExpertKey] = []

    def read(self, key: ExpertKey, out: Any = None):  # type: ignore[no-untyped-def]
        self.started.append(key)
        time.sleep(READ_S)
        return super().read(key, out)


def slow_store(reference: ResidentRun, bandwidth: float) -> ExpertStore:
    """A prefetching store over SlowDisk."""
    cfg = StoreConfig(
        fast_budget_bytes=64 * EXPERT_BYTES,
        policy="predictive",
        prefetch=True,
        prefetch_bandwidth_bytes_per_s=bandwidth,
    )
    store = ExpertStore(resolve_model_dir("demo-moe"), cfg, reference.ctx)
    store.disk = SlowDisk(resolve_model_dir("demo-moe"), "float16")
    return store


def test_demand_is_not_queued_behind_prefetch(reference: ResidentRun) -> None:
    """With 12 forecasts queued, a demand miss costs about one read, not thirteen."""
    store = slow_store(reference, 0.0)
    try:
        store.begin_forward(1)
        store.forecast({store.tick_of(3): [ExpertKey(3, e) for e in range(12)]})
        time.sleep(0.01)  # the worker has started its first read
        store.experts(0, [5], [1])
        # Its read starts after the one in flight (a few more on a loaded machine), not after all
        # twelve: an order, not a time, so a slow machine cannot fail it.
        assert store.disk.started.index(ExpertKey(0, 5)) <= 4, store.disk.started
        store.drain()
        assert store.stats.prefetch_issued == 12
    finally:
        store.close()


def test_prefetch_bandwidth_budget(reference: ResidentRun) -> None:
    """At 10 experts/s, 5 prefetches take at least ~0.4 s."""
    store = slow_store(reference, 10 * EXPERT_BYTES)
    store.disk = DiskTier(resolve_model_dir("demo-moe"), "float16")
    try:
        store.begin_forward(1)
        t0 = time.perf_counter()
        store.forecast({store.tick_of(3): [ExpertKey(3, e) for e in range(5)]})
        store.drain()
        assert time.perf_counter() - t0 >= 0.35
        assert store.stats.prefetch_issued == 5
    finally:
        store.close()


def test_prefetch_stats_and_outputs(reference: ResidentRun) -> None:
    """Prefetching at 25% keeps outputs, and precision / recall are consistent counts."""
    cfg = StoreConfig(fast_budget_bytes=16 * EXPERT_BYTES, policy="predictive", prefetch=True)
    res, store = store_run(reference, PROMPTS, cfg)
    assert same_logits(res, reference.result)
    st = store.stats
    assert st.prefetch_issued > 0
    assert 0 <= st.prefetch_used <= st.prefetch_issued
    assert st.demand_hits_from_prefetch <= st.prefetch_used
    assert 0.0 <= st.prefetch_precision <= 1.0 and 0.0 <= st.prefetch_recall <= 1.0
    assert st.tiers["disk"].bytes_in == store.disk.bytes_read
    assert st.stall_per_token_s > 0
    assert st.distinct_experts_per_batch > 0

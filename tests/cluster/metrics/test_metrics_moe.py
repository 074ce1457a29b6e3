"""Metrics.moe: a worker's expert-store totals become batonserve_moe_* series (counters by delta)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from batonserve.cluster.metrics import Metrics
from batonserve.cluster.observer import NullObserver
from batonserve.workers.expert_store.types import ExpertStoreStats

W = {"pool": "decode", "worker": "decode-0"}


def _stats(hits: int, misses: int, load: int, stall: float) -> ExpertStoreStats:
    """Totals as a CPU store reports them: the RAM tier is the compute tier, disk below it."""
    st = ExpertStoreStats(num_layers=2, num_experts=4)
    st.tiers["ram"].hits, st.tiers["ram"].misses = hits, misses
    st.tiers["ram"].bytes_in = misses * 1000
    st.tiers["disk"].hits, st.tiers["disk"].bytes_in = misses, misses * 1000
    st.expert_load[1][3] = load
    st.expert_hits[1][3], st.expert_misses[1][3] = hits, misses
    st.prefetch_issued, st.prefetch_used, st.demand_hits_from_prefetch = 6, 4, 3
    st.stall_seconds, st.tokens, st.forwards = stall, 10, 5
    st.distinct_experts = 17
    st.resident_bytes = 4000
    return st


def test_moe_series_and_deltas(scrape: Callable[[Metrics], Any]) -> None:
    """Values read back through the exposition parser; repeated totals add nothing."""
    m = Metrics("demo-moe", ray_mirror=False)
    m.moe("decode-0", "decode", _stats(hits=30, misses=10, load=7, stall=0.5))
    m.moe("decode-0", "decode", _stats(hits=45, misses=12, load=9, stall=0.75))
    m.moe("decode-0", "decode", _stats(hits=45, misses=12, load=9, stall=0.75))  # no change
    s = scrape(m)
    assert s.value("batonserve_moe_expert_cache_hits_total", **W, tier="ram") == 45
    assert s.value("batonserve_moe_expert_cache_misses_total", **W, tier="ram") == 12
    assert s.value("batonserve_moe_expert_cache_hits_total", **W, tier="disk") == 12
    assert s.value("batonserve_moe_expert_cache_hits_total", **W, tier="gpu") == 0
    assert s.value("batonserve_moe_expert_loaded_bytes_total", **W, tier="disk") == 12000
    assert s.value("batonserve_moe_prefetch_issued_total", **W) == 6
    assert s.value("batonserve_moe_prefetch_used_total", **W) == 4
    assert s.value("batonserve_moe_stall_seconds_total", **W) == pytest.approx(0.75)
    assert s.value("batonserve_moe_tokens_total", **W) == 10
    assert s.value("batonserve_moe_layer_batches_total", **W) == 10  # 5 forwards x 2 layers
    assert s.value("batonserve_moe_distinct_experts_total", **W) == 17
    assert s.value("batonserve_moe_resident_bytes", **W) == 4000
    routed = "batonserve_moe_expert_routed_tokens_total"
    assert s.value(routed, **W, layer="1", expert="3") == 9
    assert s.value(routed, **W, layer="0", expert="0") is None  # never routed: not exported
    assert s.value("batonserve_moe_expert_hits_total", **W, layer="1", expert="3") == 45
    assert s.value("batonserve_moe_expert_misses_total", **W, layer="1", expert="3") == 12
    assert s.value("batonserve_moe_expert_hits_total", **W, layer="0", expert="0") is None
    # Prefetch recall: first demands served by a prefetch / (those + compute-tier misses).
    assert s.value("batonserve_moe_prefetch_hits_total", **W) == 3
    # The tiers' hit ratio a dashboard computes: hits / (hits + misses) of the compute tier.
    hits = s.value("batonserve_moe_expert_cache_hits_total", **W, tier="ram")
    misses = s.value("batonserve_moe_expert_cache_misses_total", **W, tier="ram")
    assert hits is not None and misses is not None
    assert hits / (hits + misses) == pytest.approx(45 / 57)


def test_moe_restart_counts_from_zero(scrape: Callable[[Metrics], Any]) -> None:
    """After a restart the new engine's totals are all new (counters never go down)."""
    m = Metrics("demo-moe", ray_mirror=False)
    m.moe("decode-0", "decode", _stats(hits=30, misses=10, load=7, stall=0.5))
    m.worker_restarted("decode", "decode-0")
    m.moe("decode-0", "decode", _stats(hits=3, misses=2, load=1, stall=0.1))
    s = scrape(m)
    assert s.value("batonserve_moe_expert_cache_hits_total", **W, tier="ram") == 33
    assert s.value("batonserve_moe_expert_routed_tokens_total", **W, layer="1", expert="3") == 8
    assert s.value("batonserve_moe_stall_seconds_total", **W) == pytest.approx(0.6)


def test_moe_rejects_bad_input() -> None:
    """Empty label values and negative totals name what is wrong."""
    m = Metrics("demo-moe", ray_mirror=False)
    with pytest.raises(ValueError, match=r"moe\.worker"):
        m.moe("", "decode", _stats(1, 1, 1, 0.1))
    bad = _stats(1, 1, 1, 0.1)
    bad.stall_seconds = -1.0
    with pytest.raises(ValueError, match=r"moe\.stats"):
        m.moe("decode-0", "decode", bad)
    NullObserver().moe("decode-0", "decode", bad)  # the null observer drops it

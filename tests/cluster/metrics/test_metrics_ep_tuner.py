"""Metrics.ep_tuner: the expert-parallel tuner's choice per bucket becomes batonserve_moe_ep_* series."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from batonserve.cluster.metrics import Metrics
from batonserve.cluster.observer import NullObserver
from batonserve.workers.parallel.ep_tuner import EPSettings, EPTuner, EPTunerStats, bucket_of

W = {"pool": "decode", "worker": "decode-0"}
A, B, C = EPSettings(1), EPSettings(2), EPSettings(4, 1.25)
SMALL, LARGE = 100, 1000  # global tokens per forward: buckets 128 and 1024
OVERLAP = "batonserve_moe_ep_overlap_degree"
CAPACITY = "batonserve_moe_ep_capacity_factor"
SWITCHES = "batonserve_moe_ep_tuner_switches_total"
FORWARDS = "batonserve_moe_ep_forwards_total"


def _tuner() -> EPTuner:
    return EPTuner([A, B, C], samples_per_candidate=2, hysteresis=0.05, probe_every=4)


def _drive(tuner: EPTuner, speed: dict[int, dict[EPSettings, float]], forwards: int) -> None:
    """Alternate the two buckets' forwards; each forward takes its synthetic time."""
    for i in range(forwards):
        tokens = SMALL if i % 2 == 0 else LARGE
        s = tuner.choose(tokens)
        tuner.observe(speed[bucket_of(tokens)][s])


def _assert_exports(s: Any, stats: EPTunerStats, labels: dict[str, str]) -> None:
    """The gauges hold the tuner's current choice per bucket; the counters its totals."""
    assert s.value(FORWARDS, **labels) == stats.forwards
    assert {d["bucket"] for d in s.labelsets(OVERLAP) if d["worker"] == labels["worker"]} == {
        str(b) for b in stats.buckets
    }
    for b, bs in stats.buckets.items():
        bl = {**labels, "bucket": str(b)}
        assert s.value(OVERLAP, **bl) == bs.current.overlap
        assert s.value(CAPACITY, **bl) == bs.current.capacity_factor
        assert s.value(SWITCHES, **bl) == bs.switches


def test_ep_tuner_gauges_follow_choices_and_switches_count_by_delta(
    scrape: Callable[[Metrics], Any],
) -> None:
    """Explore, pick per bucket, then switch one bucket: read back as Prometheus would."""
    small, large = bucket_of(SMALL), bucket_of(LARGE)
    speed = {small: {A: 1.0, B: 0.8, C: 0.9}, large: {A: 2.0, B: 2.4, C: 2.2}}
    tuner = _tuner()
    m = Metrics("demo-moe", ray_mirror=False)
    _drive(tuner, speed, 40)
    first = tuner.stats
    assert first.buckets[small].current == B and first.buckets[large].current == A
    assert all(bs.switches == 0 for bs in first.buckets.values())
    m.ep_tuner("decode-0", "decode", first)
    s = scrape(m)
    _assert_exports(s, first, W)
    assert s.value(OVERLAP, **W, bucket=str(small)) == 2
    assert s.value(SWITCHES, **W, bucket=str(small)) == 0  # exported at zero before any switch

    speed[small][C] = 0.5  # clearly faster now: the small bucket switches to C
    _drive(tuner, speed, 120)
    stats = tuner.stats
    assert stats.buckets[small].current == C and stats.buckets[small].switches == 1
    assert stats.buckets[large].current == A
    m.ep_tuner("decode-0", "decode", stats)
    m.ep_tuner("decode-0", "decode", stats)  # the same totals again add nothing
    s = scrape(m)
    _assert_exports(s, stats, W)
    assert s.value(OVERLAP, **W, bucket=str(small)) == 4
    assert s.value(CAPACITY, **W, bucket=str(small)) == pytest.approx(1.25)
    assert s.value(CAPACITY, **W, bucket=str(large)) == 0  # uncapped
    assert s.value(FORWARDS, **W) == 160


def test_ep_tuner_restart_counts_everything_as_new(scrape: Callable[[Metrics], Any]) -> None:
    """Smaller totals (reported or not) start over; buckets the new tuner lacks stop exporting."""
    small, large = bucket_of(SMALL), bucket_of(LARGE)
    speed = {small: {A: 1.0, B: 0.8, C: 0.9}, large: {A: 2.0, B: 2.4, C: 2.2}}
    old = _tuner()
    _drive(old, speed, 40)
    speed[small][C] = 0.5
    _drive(old, speed, 120)
    assert old.stats.buckets[small].switches == 1
    m = Metrics("demo-moe", ray_mirror=False)
    m.ep_tuner("decode-0", "decode", old.stats)

    # The worker restarts unreported; its new tuner has only seen the small bucket, and switched.
    new = _tuner()
    speed[small] = {A: 1.0, B: 0.8, C: 0.9}
    for _ in range(30):
        new.observe(speed[small][new.choose(SMALL)])
    speed[small][C] = 0.5
    for _ in range(60):
        new.observe(speed[small][new.choose(SMALL)])
    assert new.stats.forwards == 90 < old.stats.forwards
    assert new.stats.buckets[small].switches == 1 and large not in new.stats.buckets
    m.ep_tuner("decode-0", "decode", new.stats)
    s = scrape(m)
    assert s.value(FORWARDS, **W) == 160 + 90
    assert s.value(SWITCHES, **W, bucket=str(small)) == 1 + 1
    assert s.value(OVERLAP, **W, bucket=str(small)) == 4
    assert s.value(OVERLAP, **W, bucket=str(large)) is None  # the new tuner has no choice there
    assert s.value(CAPACITY, **W, bucket=str(large)) is None
    assert s.value(SWITCHES, **W, bucket=str(large)) == 0  # counters stay (never go down)

    # A reported restart resets the baseline even when the new totals are not smaller.
    m.worker_restarted("decode", "decode-0")
    m.ep_tuner("decode-0", "decode", new.stats)
    s = scrape(m)
    assert s.value(FORWARDS, **W) == 160 + 90 + 90
    assert s.value(SWITCHES, **W, bucket=str(small)) == 1 + 1 + 1


def test_ep_tuner_pool_change_and_removal_drop_gauges(scrape: Callable[[Metrics], Any]) -> None:
    """A worker in a new pool is a new label set; a removed worker's choices stop exporting."""
    tuner = _tuner()
    _drive(
        tuner,
        {bucket_of(SMALL): {A: 1.0, B: 0.8, C: 0.9}, bucket_of(LARGE): {A: 1.0, B: 1.1, C: 1.2}},
        20,
    )
    m = Metrics("demo-moe", ray_mirror=False)
    m.ep_tuner("decode-0", "decode", tuner.stats)
    m.ep_tuner("decode-0", "mixed", tuner.stats)
    s = scrape(m)
    moved = {**W, "pool": "mixed"}
    _assert_exports(s, tuner.stats, moved)
    assert s.labelsets(OVERLAP) == [
        {**moved, "bucket": str(b)} for b in sorted(tuner.stats.buckets)
    ]
    m.worker_removed("decode-0")
    s = scrape(m)
    assert s.labelsets(OVERLAP) == [] and s.labelsets(CAPACITY) == []


def test_ep_tuner_rejects_bad_input() -> None:
    """Empty label values and impossible stats name the field."""
    tuner = _tuner()
    tuner.choose(SMALL)
    tuner.observe(0.1)
    m = Metrics("demo-moe", ray_mirror=False)
    with pytest.raises(ValueError, match=r"ep_tuner\.worker"):
        m.ep_tuner("", "decode", tuner.stats)
    with pytest.raises(ValueError, match=r"ep_tuner\.pool"):
        m.ep_tuner("decode-0", "", tuner.stats)
    with pytest.raises(ValueError, match=r"ep_tuner\.stats\.forwards"):
        m.ep_tuner("decode-0", "decode", EPTunerStats(forwards=-1))
    bad = EPTunerStats(forwards=1, buckets={100: tuner.stats.buckets[bucket_of(SMALL)]})
    with pytest.raises(ValueError, match=r"ep_tuner\.stats\.buckets\[100\].*powers of two"):
        m.ep_tuner("decode-0", "decode", bad)
    tuner.stats.buckets[bucket_of(SMALL)].switches = -1
    with pytest.raises(ValueError, match=r"ep_tuner\.stats\.buckets\[128\]\.switches"):
        m.ep_tuner("decode-0", "decode", tuner.stats)
    NullObserver().ep_tuner("decode-0", "decode", tuner.stats)  # the null observer drops it

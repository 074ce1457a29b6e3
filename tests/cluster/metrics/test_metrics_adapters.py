"""The producers' own typed stats and events reach the right series through the adapters."""

from __future__ import annotations

from batonserve.cluster.metrics import Metrics
from batonserve.cluster.metrics_adapters import (
    pool_change_from_role_change,
    rejection_from_scheduler,
)
from batonserve.cluster.scheduling.types import Rejection, RejectReason, RoleChange
from batonserve.cluster.worker_stats import worker_snapshot
from batonserve.workers.worker_types import WorkerStats

W = {"pool": "decode", "worker": "decode-1"}


def _stats(queries: int, hits: int, preemptions: int) -> WorkerStats:
    return WorkerStats(
        name="decode-1",
        pool="decode",
        role="decode",
        healthy=True,
        running=6,
        waiting=2,
        pinned=0,
        pending_prefill_tokens=300,
        num_free_blocks=20,
        num_blocks=40,
        block_size=16,
        kv_usage=0.5,
        prefix_queries=queries,
        prefix_hits=hits,
        steps=3,
        exports=0,
        imports=0,
        preemptions=preemptions,
    )


def test_cumulative_counters_follow_the_latest_stats(scrape) -> None:
    m = Metrics("demo")
    m.worker_snapshot(worker_snapshot(_stats(50, 20, 1)))
    m.worker_snapshot(worker_snapshot(_stats(80, 30, 3)))
    s = scrape(m)
    assert s.value("batonserve_kv_cache_usage_perc", **W) == 0.5
    assert s.value("batonserve_worker_running_batch_size", **W) == 6
    assert s.value("batonserve_worker_waiting_requests", **W) == 2
    assert s.value("batonserve_worker_pending_prefill_tokens", **W) == 300
    assert s.value("batonserve_prefix_cache_queries_total", **W) == 80
    assert s.value("batonserve_prefix_cache_hits_total", **W) == 30
    assert s.value("batonserve_num_preemptions_total", **W) == 3


def test_worker_actor_stats_become_worker_series(scrape) -> None:
    stats = WorkerStats(
        name="prefill-0",
        pool="prefill",
        role="mixed",
        healthy=True,
        running=1,
        waiting=4,
        pinned=0,
        pending_prefill_tokens=900,
        num_free_blocks=10,
        num_blocks=40,
        block_size=16,
        kv_usage=0.75,
        prefix_queries=200,
        prefix_hits=120,
        steps=7,
        exports=0,
        imports=0,
        preemptions=2,
        regroup_deferred=15,
    )
    m = Metrics("demo")
    m.worker_snapshot(worker_snapshot(stats))
    s = scrape(m)
    w = {"pool": "prefill", "worker": "prefill-0"}
    assert s.value("batonserve_worker_role", role="mixed", **w) == 1
    assert s.value("batonserve_kv_cache_usage_perc", **w) == 0.75
    assert s.value("batonserve_worker_waiting_requests", **w) == 4
    assert s.value("batonserve_worker_pending_prefill_tokens", **w) == 900
    assert s.value("batonserve_prefix_cache_hits_total", **w) == 120
    assert s.value("batonserve_num_preemptions_total", **w) == 2
    assert s.value("batonserve_moe_regroup_deferred_total", **w) == 15
    # The controller's role wins over the one the worker last reported.
    m.worker_snapshot(worker_snapshot(stats, role="decode"))
    s = scrape(m)
    assert s.value("batonserve_worker_role", role="decode", **w) == 1


def test_scheduler_rejections_and_role_changes(scrape) -> None:
    m = Metrics("demo")
    m.request_rejected(rejection_from_scheduler(Rejection("r1", RejectReason.KV_EXHAUSTED, "full")))
    change = RoleChange("decode-1", "borrow", "decode", "mixed", "prefill_pressure", time=1.0)
    m.pool_change(pool_change_from_role_change(change, pool="decode"))
    s = scrape(m)
    assert s.value("batonserve_rejections_total", model="demo", reason="kv_exhausted") == 1
    labels = {"pool": "decode", "change": "borrow", "from_role": "decode", "to_role": "mixed"}
    assert s.value("batonserve_pool_changes_total", **labels) == 1

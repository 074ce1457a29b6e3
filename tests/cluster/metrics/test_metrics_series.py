"""Every series moves as documented when fed through the typed inputs (read back as Prometheus would)."""

from __future__ import annotations

import math
import urllib.request

import pytest

from batonserve.cluster.metrics import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    HandoffRecord,
    Metrics,
    PoolChange,
    RequestFinished,
    RequestRejected,
    WorkerSnapshot,
    token_buckets,
)

M = {"model": "demo"}


def _finished(**kw: object) -> RequestFinished:
    base: dict[str, object] = dict(
        code="OK",
        finish_reason="stop",
        prompt_tokens=12,
        generation_tokens=7,
        cached_tokens=4,
        duration_seconds=1.2,
        started=True,
    )
    base.update(kw)
    return RequestFinished(**base)  # type: ignore[arg-type]


def _snap(**kw: object) -> WorkerSnapshot:
    base: dict[str, object] = dict(
        worker="decode-0",
        pool="decode",
        role="decode",
        kv_cache_usage=0.25,
        running=3,
        waiting=1,
        prefix_cache_queries=100,
        prefix_cache_hits=40,
    )
    base.update(kw)
    return WorkerSnapshot(**base)  # type: ignore[arg-type]


def test_fresh_registry_exports_zeroed_request_series(scrape) -> None:
    s = scrape(Metrics("demo"))
    for name in ("requests_in_flight", "num_requests_waiting", "num_requests_running"):
        assert s.value(f"batonserve_{name}", **M) == 0
    assert s.value("batonserve_time_to_first_token_seconds_count", **M) == 0
    assert s.value("batonserve_generation_tokens_total", **M) == 0
    assert s.labelsets("batonserve_requests_total") == []  # codes appear when they happen


def test_request_lifecycle_moves_gauges_histograms_and_counters(scrape) -> None:
    m = Metrics("demo")
    m.request_admitted()
    s = scrape(m)
    assert s.value("batonserve_num_requests_waiting", **M) == 1
    assert s.value("batonserve_requests_in_flight", **M) == 1
    assert s.value("batonserve_num_requests_running", **M) == 0

    m.request_started(queue_seconds=0.4)
    m.first_token(ttft_seconds=0.05)
    m.inter_token(0.06)
    m.inter_token(0.2, tokens=2)  # one delta with two tokens: two gaps of 0.1 s
    s = scrape(m)
    assert (s.value("batonserve_num_requests_waiting", **M), s.value("batonserve_num_requests_running", **M)) == (0, 1)  # fmt: skip
    assert s.value("batonserve_requests_in_flight", **M) == 1
    assert s.value("batonserve_request_queue_time_seconds_sum", **M) == pytest.approx(0.4)
    assert s.value("batonserve_request_queue_time_seconds_bucket", le="0.3", **M) == 0
    assert s.value("batonserve_request_queue_time_seconds_bucket", le="0.5", **M) == 1
    assert s.value("batonserve_time_to_first_token_seconds_bucket", le="0.04", **M) == 0
    assert s.value("batonserve_time_to_first_token_seconds_bucket", le="0.06", **M) == 1
    assert s.value("batonserve_inter_token_latency_seconds_count", **M) == 3
    assert s.value("batonserve_inter_token_latency_seconds_sum", **M) == pytest.approx(0.26)
    assert s.value("batonserve_inter_token_latency_seconds_bucket", le="0.075", **M) == 1
    assert s.value("batonserve_inter_token_latency_seconds_bucket", le="0.1", **M) == 3

    m.request_finished(_finished())
    s = scrape(m)
    assert s.value("batonserve_requests_total", code="OK", finish_reason="stop", **M) == 1
    assert s.value("batonserve_requests_in_flight", **M) == 0
    assert s.value("batonserve_num_requests_running", **M) == 0
    assert s.value("batonserve_e2e_request_latency_seconds_sum", **M) == pytest.approx(1.2)
    assert s.value("batonserve_e2e_request_latency_seconds_bucket", le="1.0", **M) == 0
    assert s.value("batonserve_e2e_request_latency_seconds_bucket", le="1.5", **M) == 1
    assert s.value("batonserve_prompt_tokens_total", **M) == 12
    assert s.value("batonserve_generation_tokens_total", **M) == 7
    assert s.value("batonserve_cached_prompt_tokens_total", **M) == 4
    assert s.value("batonserve_request_prompt_tokens_bucket", le="10.0", **M) == 0
    assert s.value("batonserve_request_prompt_tokens_bucket", le="20.0", **M) == 1
    assert s.value("batonserve_request_generation_tokens_bucket", le="5.0", **M) == 0
    assert s.value("batonserve_request_generation_tokens_bucket", le="10.0", **M) == 1


def test_request_cancelled_while_waiting_leaves_gauges_balanced(scrape) -> None:
    m = Metrics("demo")
    m.request_admitted()
    m.request_admitted()
    m.request_finished(_finished(code="CANCELLED", finish_reason="abort", started=False))
    m.request_finished(_finished(code="UNAVAILABLE", finish_reason=None, started=False))
    s = scrape(m)
    assert s.value("batonserve_num_requests_waiting", **M) == 0
    assert s.value("batonserve_requests_in_flight", **M) == 0
    assert s.value("batonserve_requests_total", code="CANCELLED", finish_reason="abort", **M) == 1
    assert s.value("batonserve_requests_total", code="UNAVAILABLE", finish_reason="none", **M) == 1


def test_unbalanced_calls_raise_instead_of_going_negative() -> None:
    m = Metrics("demo")
    with pytest.raises(RuntimeError, match="request_started"):
        m.request_started(0.1)
    with pytest.raises(RuntimeError, match="request_finished"):
        m.request_finished(_finished(started=True))
    with pytest.raises(ValueError, match="first_token"):
        m.first_token(-1.0)
    with pytest.raises(ValueError, match=r"inter_token\.tokens"):
        m.inter_token(0.1, tokens=0)
    with pytest.raises(ValueError, match="first_token"):
        m.first_token(math.nan)


def test_rejections_count_by_reason_and_as_requests_by_code(scrape) -> None:
    m = Metrics("demo")
    m.request_rejected(RequestRejected("queue_full"))
    m.request_rejected(RequestRejected("queue_full"))
    m.request_rejected(RequestRejected("prompt_too_long", code="INVALID_ARGUMENT"))
    s = scrape(m)
    assert s.value("batonserve_rejections_total", reason="queue_full", **M) == 2
    assert s.value("batonserve_rejections_total", reason="prompt_too_long", **M) == 1
    assert s.value("batonserve_requests_total", code="RESOURCE_EXHAUSTED", finish_reason="none", **M) == 2  # fmt: skip
    assert s.value("batonserve_requests_total", code="INVALID_ARGUMENT", finish_reason="none", **M) == 1  # fmt: skip
    assert s.value("batonserve_requests_in_flight", **M) == 0


def test_worker_snapshot_gauges_and_prefix_cache_deltas(scrape) -> None:
    m = Metrics("demo")
    w = {"pool": "decode", "worker": "decode-0"}
    m.worker_snapshot(_snap())
    m.worker_snapshot(_snap(kv_cache_usage=0.75, running=5, waiting=0, prefix_cache_queries=130, prefix_cache_hits=50))  # fmt: skip
    s = scrape(m)
    assert s.value("batonserve_kv_cache_usage_perc", **w) == 0.75
    assert s.value("batonserve_worker_running_batch_size", **w) == 5
    assert s.value("batonserve_worker_waiting_requests", **w) == 0
    assert s.value("batonserve_worker_role", role="decode", **w) == 1
    # Totals 100 then 130 are counted once: the counter equals the latest total.
    assert s.value("batonserve_prefix_cache_queries_total", **w) == 130
    assert s.value("batonserve_prefix_cache_hits_total", **w) == 50
    # A smaller total means the engine restarted: its new total is all new work.
    m.worker_snapshot(_snap(prefix_cache_queries=20, prefix_cache_hits=5))
    s = scrape(m)
    assert s.value("batonserve_prefix_cache_queries_total", **w) == 150
    assert s.value("batonserve_prefix_cache_hits_total", **w) == 55


def test_role_change_keeps_one_role_series_per_worker(scrape) -> None:
    m = Metrics("demo")
    m.worker_snapshot(_snap(worker="prefill-1", pool="prefill", role="prefill"))
    m.worker_snapshot(_snap(worker="prefill-1", pool="prefill", role="mixed"))
    s = scrape(m)
    assert s.labelsets("batonserve_worker_role") == [
        {"pool": "prefill", "worker": "prefill-1", "role": "mixed"}
    ]
    assert s.value("batonserve_worker_role", pool="prefill", worker="prefill-1", role="mixed") == 1


def test_worker_removed_drops_its_gauges_but_keeps_counters(scrape) -> None:
    m = Metrics("demo")
    m.worker_snapshot(_snap())
    m.worker_snapshot(_snap(worker="decode-1"))
    m.worker_removed("decode-0")
    s = scrape(m)
    workers = {ls["worker"] for ls in s.labelsets("batonserve_kv_cache_usage_perc")}
    assert workers == {"decode-1"}
    assert [ls["worker"] for ls in s.labelsets("batonserve_worker_role")] == ["decode-1"]
    assert s.value("batonserve_prefix_cache_queries_total", pool="decode", worker="decode-0") == 100


def test_worker_restart_counts_and_resets_the_delta_baseline(scrape) -> None:
    m = Metrics("demo")
    w = {"pool": "decode", "worker": "decode-0"}
    m.worker_snapshot(_snap(prefix_cache_queries=100, prefix_cache_hits=40))
    assert scrape(m).value("batonserve_worker_restarts_total", **w) == 0  # from first sight
    m.worker_restarted("decode", "decode-0")
    # The restarted engine already did 120 queries before its first snapshot: all of them count.
    m.worker_snapshot(_snap(prefix_cache_queries=120, prefix_cache_hits=60))
    s = scrape(m)
    assert s.value("batonserve_worker_restarts_total", **w) == 1
    assert s.value("batonserve_prefix_cache_queries_total", **w) == 220
    assert s.value("batonserve_prefix_cache_hits_total", **w) == 100


def test_kv_handoff_outcomes(scrape) -> None:
    m = Metrics("demo")
    h = {"from_pool": "prefill", "to_pool": "decode"}
    m.kv_handoff(HandoffRecord("prefill", "decode", seconds=0.006, bytes=4096))
    # A pool pair's failure counters exist at 0 from its first handoff (ratios read 0, not empty).
    assert scrape(m).value("batonserve_kv_handoff_failures_total", **h) == 0
    assert scrape(m).value("batonserve_kv_handoff_lease_expiries_total", **h) == 0
    m.kv_handoff(HandoffRecord("prefill", "decode", seconds=0.02, bytes=1024, outcome="failed"))
    m.kv_handoff(HandoffRecord("prefill", "decode", seconds=5.0, bytes=0, outcome="lease_expired"))
    # Its request ended first (finished on its first token): counted, not a failure.
    m.kv_handoff(HandoffRecord("prefill", "decode", seconds=0.01, bytes=0, outcome="cancelled"))
    s = scrape(m)
    assert s.value("batonserve_kv_handoffs_total", **h) == 4
    assert s.value("batonserve_kv_handoff_failures_total", **h) == 2
    assert s.value("batonserve_kv_handoff_lease_expiries_total", **h) == 1
    assert s.value("batonserve_kv_handoff_bytes_total", **h) == 5120
    assert s.value("batonserve_kv_handoff_seconds_count", **h) == 1  # only the successful one
    assert s.value("batonserve_kv_handoff_seconds_bucket", le="0.005", **h) == 0
    assert s.value("batonserve_kv_handoff_seconds_bucket", le="0.0075", **h) == 1


def test_pool_changes(scrape) -> None:
    m = Metrics("demo")
    m.pool_change(PoolChange("prefill", "borrow", from_role="prefill", to_role="mixed"))
    m.pool_change(PoolChange("prefill", "return", from_role="mixed", to_role="prefill"))
    m.pool_change(PoolChange("prefill", "borrow", from_role="prefill", to_role="mixed"))
    s = scrape(m)
    lab = {"pool": "prefill", "from_role": "prefill", "to_role": "mixed"}
    assert s.value("batonserve_pool_changes_total", change="borrow", **lab) == 2
    back = {"pool": "prefill", "from_role": "mixed", "to_role": "prefill"}
    assert s.value("batonserve_pool_changes_total", change="return", **back) == 1


def test_buckets_are_vllms(scrape) -> None:
    m = Metrics("demo", max_model_len=4096)
    s = scrape(m)

    def les(name: str) -> list[float]:
        return [float(ls["le"]) for ls in s.labelsets(f"{name}_bucket")][:-1]  # drop +Inf

    assert les("batonserve_time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert TTFT_BUCKETS[:4] == (0.001, 0.005, 0.01, 0.02) and TTFT_BUCKETS[-1] == 2560.0
    assert les("batonserve_inter_token_latency_seconds") == list(ITL_BUCKETS)
    assert len(ITL_BUCKETS) == 19 and len(REQUEST_LATENCY_BUCKETS) == 21
    assert les("batonserve_e2e_request_latency_seconds") == list(REQUEST_LATENCY_BUCKETS)
    assert les("batonserve_request_prompt_tokens") == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]  # fmt: skip
    assert token_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    with pytest.raises(ValueError, match="max_model_len"):
        token_buckets(0)


def test_inputs_reject_bad_values_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"RequestFinished\.code"):
        _finished(code="ok")
    with pytest.raises(ValueError, match=r"RequestFinished\.finish_reason"):
        _finished(finish_reason="eos")
    with pytest.raises(ValueError, match=r"RequestFinished\.prompt_tokens"):
        _finished(prompt_tokens=-1)
    with pytest.raises(ValueError, match=r"WorkerSnapshot\.kv_cache_usage"):
        _snap(kv_cache_usage=1.5)
    with pytest.raises(ValueError, match=r"WorkerSnapshot\.prefix_cache_hits"):
        _snap(prefix_cache_queries=1, prefix_cache_hits=2)
    with pytest.raises(ValueError, match=r"WorkerSnapshot\.worker"):
        _snap(worker="")
    with pytest.raises(ValueError, match=r"HandoffRecord\.outcome"):
        HandoffRecord("a", "b", 0.1, 1, outcome="lost")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"PoolChange\.change"):
        PoolChange("a", "lend", "prefill", "mixed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"RequestRejected\.reason"):
        RequestRejected("")
    with pytest.raises(ValueError, match="model"):
        Metrics("")


def test_instances_have_independent_registries(scrape) -> None:
    a, b = Metrics("demo"), Metrics("demo")
    a.request_rejected(RequestRejected("queue_full"))
    assert scrape(a).value("batonserve_rejections_total", reason="queue_full", **M) == 1
    assert scrape(b).value("batonserve_rejections_total", reason="queue_full", **M) is None


def test_http_endpoint_serves_metrics_on_loopback() -> None:
    m = Metrics("demo")
    port = m.start_http_server("127.0.0.1", 0)
    try:
        m.request_rejected(RequestRejected("queue_full"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'batonserve_rejections_total{model="demo",reason="queue_full"} 1.0' in body
        assert "_created" not in body
        with pytest.raises(RuntimeError, match="already serving"):
            m.start_http_server("127.0.0.1", 0)
    finally:
        m.close()

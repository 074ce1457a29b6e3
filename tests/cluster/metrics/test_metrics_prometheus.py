"""A real Prometheus server scrapes the metrics endpoint while requests run; PromQL sees the truth.

Needs Debian's `prometheus` binary (tests/install-tools.sh installs it). The synthetic load drives
the Metrics API directly; tests/cluster/e2e/test_serve_cli.py points Prometheus at `batonserve serve`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit.prometheus_server import PrometheusServer

from batonserve.cluster.metrics import (
    TTFT_BUCKETS,
    HandoffRecord,
    Metrics,
    PoolChange,
    RequestFinished,
    RequestRejected,
    WorkerSnapshot,
)
from batonserve.cluster.metrics_inputs import HandoffOutcome

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = "deploy/helm/batonserve/dashboards/batonserve.json"

WAVES = 8  # waves of requests, each in flight for a while, so scrapes see them running
PER_WAVE = 10
N = WAVES * PER_WAVE
REJECTED = 5
DEADLINE_S = 20.0  # for Prometheus to start, and to ingest the final scrape


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Metrics, PrometheusServer]]:
    """Metrics served on a free loopback port, and a Prometheus scraping it every second."""
    metrics = Metrics("demo", ray_mirror=False)
    port = metrics.start_http_server("127.0.0.1", 0)
    prom = PrometheusServer(tmp_path, port)
    try:
        yield metrics, prom
    finally:
        prom.stop()
        metrics.close()


def _cluster_events(metrics: Metrics, wave: int) -> None:
    """Worker stats and cluster events of one wave, so every dashboard panel has data."""
    q = 100 * (wave + 1)
    metrics.worker_snapshot(
        WorkerSnapshot(
            "decode-0", "decode", "decode", 0.1 * (wave + 1), PER_WAVE, 0, q, q // 2,
            block_size=16, num_blocks=512,
        )
    )  # fmt: skip
    metrics.iteration_tokens("decode-0", "decode", (PER_WAVE, PER_WAVE + 64, PER_WAVE))
    role = "mixed" if 2 <= wave < 6 else "prefill"
    metrics.worker_snapshot(
        WorkerSnapshot("prefill-0", "prefill", role, 0.95, 2, 1, q, q // 4, 500, preemptions=wave)
    )
    if wave == 1:
        for _ in range(REJECTED):
            metrics.request_rejected(RequestRejected("queue_full"))
    if wave == 2:
        metrics.pool_change(PoolChange("prefill", "borrow", "prefill", "mixed"))
    if wave == 6:
        metrics.pool_change(PoolChange("prefill", "return", "mixed", "prefill"))
    if wave == 4:
        metrics.worker_restarted("decode", "decode-0")
    if wave in (3, 5):
        outcome: HandoffOutcome = "failed" if wave == 3 else "lease_expired"
        metrics.kv_handoff(HandoffRecord("prefill", "decode", 0.5, 1024, outcome=outcome))


def _documented_queries() -> list[str]:
    """Every ```promql block of docs/operations.md and every panel query of the dashboard."""
    text = (ROOT / "docs" / "operations.md").read_text()
    docs = [b.strip() for b in re.findall(r"```promql\n(.*?)```", text, flags=re.S)]
    assert len(docs) >= 20, "docs/operations.md lost its PromQL cookbook"
    dash = json.loads((ROOT / DASHBOARD).read_text())
    panel = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    # Grafana's variables, as Grafana would substitute them for "All" and a 1 s scrape.
    panel = [e.replace("$__rate_interval", "1m").replace("$model", ".*") for e in panel]
    return docs + panel


def _ttft(i: int) -> float:
    """Deterministic TTFTs spread over [0.02, 0.25] s (a permutation, so waves mix them)."""
    return 0.02 + 0.23 * ((i * 37) % N) / (N - 1)


@pytest.mark.slow
def test_prometheus_scrapes_counts_and_ttft_quantile(
    served: tuple[Metrics, PrometheusServer],
) -> None:
    metrics, prom = served
    prom.wait_for('up{job="batonserve"}', 1.0)  # at least one scrape before the load

    generated = 0
    for wave in range(WAVES):
        ids = range(wave * PER_WAVE, (wave + 1) * PER_WAVE)
        for i in ids:
            metrics.request_admitted()
            metrics.request_params(max_tokens=16, n=1 + i % 2)
            metrics.request_started()  # the queue time comes with request_finished
            metrics.first_token(_ttft(i))
            metrics.kv_handoff(HandoffRecord("prefill", "decode", seconds=0.006, bytes=65536))
        _cluster_events(metrics, wave)
        time.sleep(0.6)  # the wave is in flight while Prometheus scrapes
        for i in ids:
            tokens = 1 + i % 4
            for _ in range(tokens - 1):
                metrics.inter_token(0.03)
            code, reason = ("CANCELLED", "abort") if i % 10 == 0 else ("OK", "stop")
            decode = 0.03 * (tokens - 1)
            metrics.request_finished(
                RequestFinished(
                    code, reason, 16, tokens, 0, _ttft(i) + decode, True,
                    queue_seconds=0.01, prefill_seconds=_ttft(i) - 0.01,
                    decode_seconds=decode, inference_seconds=_ttft(i) - 0.01 + decode,
                )
            )  # fmt: skip
            generated += tokens
        time.sleep(0.1)

    prom.wait_for("sum(batonserve_requests_total)", float(N + REJECTED))
    by_code = {lab["code"]: v for lab, v in prom.query("sum by (code) (batonserve_requests_total)")}
    assert by_code == {"OK": N - WAVES, "CANCELLED": WAVES, "RESOURCE_EXHAUSTED": REJECTED}
    assert prom.scalar("sum(batonserve_generation_tokens_total)") == generated
    assert prom.scalar("sum(batonserve_rejections_total)") == REJECTED
    by_reason = prom.query("sum by (finished_reason) (batonserve_request_success_total)")
    assert {lab["finished_reason"]: v for lab, v in by_reason} == {"stop": N - WAVES}
    assert prom.scalar("sum(batonserve_request_queue_time_seconds_count)") == N
    assert prom.scalar("sum(batonserve_request_params_n_sum)") == sum(1 + i % 2 for i in range(N))
    assert prom.scalar("sum(batonserve_kv_handoffs_total)") == N + 2
    assert prom.scalar("sum(batonserve_kv_handoff_failures_total)") == 2
    assert prom.scalar("batonserve_requests_in_flight") == 0
    assert prom.scalar('batonserve_kv_cache_usage_perc{worker="decode-0"}') == pytest.approx(0.8)
    # Requests were in flight during scrapes, not only before or after them.
    assert (prom.scalar("max_over_time(batonserve_requests_in_flight[1m])") or 0) >= 1

    # The median TTFT from the buckets lies in the bucket that holds the true median.
    fed = sorted(_ttft(i) for i in range(N))
    true_median = fed[N // 2]
    hi = min(b for b in TTFT_BUCKETS if b >= true_median)
    lo = max(b for b in TTFT_BUCKETS if b < true_median)
    q = "histogram_quantile(0.5, sum by (le) (rate(batonserve_time_to_first_token_seconds_bucket[1m])))"  # fmt: skip
    p50 = prom.scalar(q)
    assert p50 is not None and lo <= p50 <= hi, (p50, lo, hi, true_median)
    assert fed[0] <= p50 <= fed[-1]
    p95 = prom.scalar(
        "histogram_quantile(0.95, sum by (le) (rate(batonserve_kv_handoff_seconds_bucket[1m])))"
    )
    assert p95 is not None and 0.005 <= p95 <= 0.0075  # every successful handoff took 6 ms

    # The cookbook and the dashboard are valid PromQL and, after this load, all have data.
    for promql in _documented_queries():
        assert prom.query(promql), f"no data for: {promql}"

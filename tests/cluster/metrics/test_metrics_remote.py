"""An attached router's /metrics: its request series and the cluster actor's worker series,
merged into one exposition that a Prometheus parser accepts (one family per name, each sample
the sum of both sides), and the router's own series still served when the cluster is gone."""

from __future__ import annotations

import pickle
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from batonserve.cluster.metrics import Metrics
from batonserve.cluster.metrics_inputs import HandoffRecord, RequestFinished, WorkerSnapshot
from batonserve.cluster.metrics_remote import merge_families, serve_merged


def _sides() -> tuple[Metrics, Metrics]:
    router = Metrics("demo", ray_mirror=False)
    router.request_admitted()
    router.request_started(0.01)
    router.request_finished(RequestFinished("OK", "length", 4, 8, 0, 0.5, True))
    cluster = Metrics("demo", ray_mirror=False)
    cluster.worker_snapshot(WorkerSnapshot("decode-0", "decode", "decode", 0.25, 1, 0, 10, 4))
    cluster.kv_handoff(HandoffRecord("prefill", "decode", 0.004, 4096))
    return router, cluster


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_merged_exposition_sums_both_sides() -> None:
    router, cluster = _sides()
    remote = pickle.loads(pickle.dumps(list(cluster.registry.collect())))  # as Ray ships them
    server, port = serve_merged(router.registry, lambda: remote, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert text.count("# TYPE batonserve_requests_total counter") == 1
    got = _samples(text)
    ok = ("model", "demo"), ("code", "OK"), ("finish_reason", "length")
    assert got[("batonserve_requests_total", tuple(sorted(ok)))] == 1.0
    assert (
        got[("batonserve_kv_cache_usage_perc", (("pool", "decode"), ("worker", "decode-0")))]
        == 0.25
    )
    handoffs = [v for (n, _), v in got.items() if n == "batonserve_kv_handoffs_total"]
    assert handoffs == [1.0]
    running = [v for (n, _), v in got.items() if n == "batonserve_num_requests_running"]
    assert running == [0.0]  # the router's gauge (0 after the request ended) plus the cluster's 0


def test_router_series_survive_a_missing_cluster() -> None:
    router, _ = _sides()

    def gone() -> list[Any]:
        raise RuntimeError("the cluster actor is gone")

    server, port = serve_merged(router.registry, gone, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            got = _samples(r.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    ok = ("model", "demo"), ("code", "OK"), ("finish_reason", "length")
    assert got[("batonserve_requests_total", tuple(sorted(ok)))] == 1.0
    assert not [n for n, _ in got if n == "batonserve_kv_cache_usage_perc"]
    assert merge_families([], []) == []

"""The Ray mirror: inside a Ray driver the key series also reach Ray's own metrics export."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batonserve.cluster.metrics import Metrics, RequestFinished, RequestRejected, WorkerSnapshot
from batonserve.cluster.metrics_ray import RAY_KEY_SERIES

DEADLINE_S = 30.0


def test_no_mirror_outside_a_ray_driver() -> None:
    # A fresh interpreter: ray imported but not initialized must not be touched.
    code = (
        "import ray\n"
        "from batonserve.cluster.metrics import Metrics\n"
        "print(Metrics('demo').ray_mirrored, ray.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
    assert not Metrics("demo", ray_mirror=False).ray_mirrored


def _ray_samples(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Ray's export of batonserve series: (name, our labels) -> value (Ray's own labels dropped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    ours = {"model", "code", "finish_reason", "reason", "pool", "worker", "role", "le"}
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_batonserve_"):
                labels = frozenset((k, v) for k, v in s.labels.items() if k in ours)
                out[(s.name, labels)] = s.value
    return out


@pytest.mark.slow
def test_key_series_reach_rays_metrics_export() -> None:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    own = not ray.is_initialized()
    if own:
        ray.init(
            address="local",  # a fresh instance, never a cluster some other test left running
            num_cpus=1,
            include_dashboard=False,
            namespace="batonserve",
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
            # Report every 0.5 s instead of 10 s, so the test sees its values quickly.
            _system_config={"metrics_report_interval_ms": 500},
        )
    try:
        m = Metrics("demo")
        assert m.ray_mirrored
        for i in range(3):
            m.request_admitted()
            m.request_started(0.01)
            m.first_token(0.05 * (i + 1))
            m.request_finished(RequestFinished("OK", "stop", 8, 4, 0, 0.5, started=True))
        m.request_rejected(RequestRejected("queue_full"))
        m.worker_snapshot(WorkerSnapshot("decode-0", "decode", "decode", 0.625, 2, 0, 0, 0))

        # The driver's metrics leave through the metrics agent of the node it runs on.
        here = ray.get_runtime_context().get_node_id()
        port = next(n["MetricsExportPort"] for n in ray.nodes() if n["NodeID"] == here)
        ok = ("ray_batonserve_requests_total", frozenset({("model", "demo"), ("code", "OK"), ("finish_reason", "stop")}))  # fmt: skip
        kv = ("ray_batonserve_kv_cache_usage_perc", frozenset({("pool", "decode"), ("worker", "decode-0")}))  # fmt: skip
        ttft = ("ray_batonserve_time_to_first_token_seconds_count", frozenset({("model", "demo")}))
        deadline = time.monotonic() + DEADLINE_S
        got: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        while time.monotonic() < deadline:
            got = _ray_samples(port)
            if got.get(ok) == 3 and got.get(ttft) == 3 and got.get(kv) == 0.625:
                break
            time.sleep(0.5)
        assert got.get(ok) == 3, sorted(k[0] for k in got)
        assert got.get(ttft) == 3 and got.get(kv) == 0.625
        rej = ("ray_batonserve_rejections_total", frozenset({("model", "demo"), ("reason", "queue_full")}))  # fmt: skip
        assert got.get(rej) == 1
        exported = {name.removeprefix("ray_") for name, _ in got}
        for suffix in ("_bucket", "_count", "_sum"):
            exported = {n.removesuffix(suffix) for n in exported}
        assert exported <= RAY_KEY_SERIES
    finally:
        if own:
            ray.shutdown()

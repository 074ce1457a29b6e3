"""The README's main job for real: `batonserve serve` on the demo model, called over gRPC, then SIGTERM.

One local Ray instance on 127.0.0.1 with one prefill and one decode worker (disaggregated), the
router and the metrics endpoint on free ports.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from testkit.prometheus_server import PrometheusServer
from testkit.serve_process import Server, cli, serve_config

from batonserve.cluster.metrics import TTFT_BUCKETS

pytestmark = pytest.mark.cluster

PROMPT = "def main("
REQUESTS = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The served demo; SIGTERM after the module's tests, which must shut it down cleanly.

    The SIGTERM check lives here rather than in a test, so no test stops the shared server
    under the ones after it, whatever the order.
    """
    s = Server(["--config", serve_config(tmp_path_factory.mktemp("serve"))])
    try:
        s.wait_for(r"batonserve: ready", timeout=240)
        yield s
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(90) == 0
        s._reader.join(10)
        assert any("stopped" in ln for ln in s.lines), "\n".join(s.lines)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()  # only if startup or the clean shutdown failed
            s.proc.wait(30)


def _ports(server: Server) -> tuple[str, str]:
    grpc_port = server.wait_for(r"router listening on 127\.0\.0\.1:(\d+)", 5).group(1)
    metrics = server.wait_for(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", 5).group(1)
    return f"127.0.0.1:{grpc_port}", metrics


def test_streamed_greedy_output_equals_offline_engine(server: Server) -> None:
    target, metrics_url = _ports(server)
    before = _ok_count(metrics_url)  # the server is shared: count only this test's request
    remote = cli("generate", "--target", target, "--max-tokens", "12", "--json", PROMPT)
    assert remote.returncode == 0, remote.stderr
    offline = cli(
        "generate", "--offline", "--model", "demo", "--max-tokens", "12", "--json", PROMPT
    )
    assert offline.returncode == 0, offline.stderr
    got, want = json.loads(remote.stdout), json.loads(offline.stdout)
    assert got["token_ids"] == want["token_ids"] and len(want["token_ids"]) > 0
    assert got["text"] == want["text"]

    status = cli("status", "--target", target)
    assert status.returncode == 0, status.stderr
    assert "prefill-0" in status.stdout and "decode-0" in status.stdout

    assert _ok_count(metrics_url) == before + 1
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert "batonserve_kv_cache_usage_perc{" in body and 'worker="decode-0"' in body


def test_prometheus_scrapes_the_served_router(server: Server, tmp_path: Path) -> None:
    """A real Prometheus scrapes `/metrics` while requests stream; PromQL sees the true counts."""
    import grpc

    from batonserve.proto import generation_pb2 as pb
    from batonserve.proto import generation_pb2_grpc as pb_grpc

    target, metrics_url = _ports(server)
    prom = PrometheusServer(tmp_path, int(metrics_url.rsplit(":", 1)[1].split("/")[0]))
    try:
        # `or vector(0)`: before any request has finished OK the series does not exist yet (when
        # this test runs first), and a bare sum() has no result at all.
        ok = 'sum(batonserve_requests_total{code="OK"}) or vector(0)'
        prom.wait_for(ok, _ok_count(metrics_url))  # Prometheus is up (and has scraped once)
        before = _ok_count(metrics_url)
        ttfts = []
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            for i in range(REQUESTS):
                req = pb.GenerateRequest(
                    text=f"import os{i}", sampling=pb.SamplingParams(max_tokens=8, temperature=0)
                )
                t0 = time.monotonic()
                stream = stub.Generate(req, timeout=60)
                next(stream)
                ttfts.append(time.monotonic() - t0)
                list(stream)
        prom.wait_for(ok, before + REQUESTS)
        p50 = prom.scalar(
            "histogram_quantile(0.5, sum by (le) (batonserve_time_to_first_token_seconds_bucket))"
        )
        assert p50 is not None and 0 < p50 <= _bucket_above(max(ttfts))
        tokens = prom.scalar("sum(batonserve_generation_tokens_total)")
        assert tokens is not None and tokens >= 8 * REQUESTS
    finally:
        prom.stop()


def _ok_count(metrics_url: str) -> float:
    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        float(ln.rsplit(" ", 1)[1])
        for ln in body.splitlines()
        if ln.startswith("batonserve_requests_total{") and 'code="OK"' in ln
    )


def _bucket_above(seconds: float) -> float:
    """The TTFT histogram bucket bound a quantile of values up to `seconds` cannot exceed."""
    return min(b for b in (*TTFT_BUCKETS, float("inf")) if b >= seconds)

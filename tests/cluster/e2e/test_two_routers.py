"""Two routers in front of one cluster (issue 17): both serve concurrent streams with the offline
engine's tokens; a third router with another config is refused, saying what differs; /metrics and
`batonserve status` of an attached router show the cluster's workers; `batonserve stop` removes
the cluster actor and every worker, after which the routers answer UNAVAILABLE, saying why."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
import ray
from testkit.router_attach import (
    NAMESPACE,
    PROMPTS,
    config,
    expected_tokens,
    router_port,
    run,
    start_router,
    stream,
    wait_baseline,
    worker_ids,
)
from testkit.serve_process import cli, serve_config

pytestmark = pytest.mark.cluster


def _metrics(server_lines: list[str]) -> str:
    port = next(
        m.group(1)
        for ln in server_lines
        if (m := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", ln))
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return str(r.read().decode())


def test_two_routers_then_stop(tmp_path: Path, ray_address: str) -> None:
    expected = expected_tokens()
    cfg = config(tmp_path)
    a = start_router(cfg, ray_address)
    b = start_router(cfg, ray_address)  # at once: one starts the cluster, the other attaches
    try:
        ports = (router_port(a), router_port(b))
        workers = worker_ids()

        async def both() -> list[list[int] | grpc.StatusCode]:
            jobs = [stream(port, t) for port in ports for t in PROMPTS]
            return list(await asyncio.gather(*jobs))

        outs = run(both())
        assert outs == expected + expected
        wait_baseline()
        assert worker_ids() == workers  # one set of workers, started once

        text = _metrics(a.lines)
        assert 'batonserve_worker_role{pool="decode",role="decode",worker="decode-0"} 1.0' in text
        ok = re.search(
            r'batonserve_requests_total\{code="OK",finish_reason="length"[^}]*\} (\S+)', text
        )
        assert ok and float(ok.group(1)) == len(PROMPTS), text  # this router's own requests
        assert text.count("# TYPE batonserve_requests_total counter") == 1
        status = cli("status", "--target", f"127.0.0.1:{ports[1]}")
        assert status.returncode == 0 and "decode-0" in status.stdout, status.stderr
        direct = cli("status", "--ray-address", ray_address, "--namespace", NAMESPACE)
        assert direct.returncode == 0 and "prefill-0" in direct.stdout, direct.stderr
        assert direct.stdout.count("(0 running)") == 2, direct.stdout  # both routers' sessions

        other = tmp_path / "other"
        other.mkdir()
        pools = "pools:\n  - {name: decode, role: decode, num_cpus: 0.25, replicas: 2}\n"
        ray_ns = f"  namespace: {NAMESPACE}\n"
        refused = cli(
            "serve", "--config", serve_config(other, pools, ray_ns), "--ray-address", ray_address
        )
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "another config already runs" in refused.stderr, refused.stderr
        assert "pools" in refused.stderr and "engine.dtype" in refused.stderr, refused.stderr

        out = cli("stop", "--ray-address", ray_address, "--namespace", NAMESPACE, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "draining the cluster (2 workers" in out.stdout and "stopped" in out.stdout
        for name in ["batonserve-cluster", *workers]:
            with pytest.raises(ValueError):
                ray.get_actor(name, namespace=NAMESPACE)
        gone = run(stream(ports[0], PROMPTS[0]))
        assert gone == grpc.StatusCode.UNAVAILABLE
        again = cli("stop", "--ray-address", ray_address, "--namespace", NAMESPACE)
        assert again.returncode == 1 and "nothing to stop" in again.stdout, again.stdout
    finally:
        for server in (a, b):
            assert server.stop() == 0, "\n".join(server.lines)
    assert any("is gone" in ln for ln in a.lines), "\n".join(a.lines)

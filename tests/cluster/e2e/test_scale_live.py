"""`batonserve scale --ray-address` sets the running cluster's desired pool sizes (issue 17): a
decode worker is added and serves, then drained away, with every stream exact and every pool
back to its baseline; a pool's last worker is never removed, and a wrong address says so."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
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
from testkit.serve_process import cli

pytestmark = pytest.mark.cluster


def _scale(address: str, *pools: str) -> tuple[int, str]:
    flags = [arg for p in pools for arg in ("--pool", p)]
    out = cli("scale", "--ray-address", address, "--ray-namespace", NAMESPACE, *flags)
    return out.returncode, out.stdout + out.stderr


def _wait_decode_workers(n: int, timeout: float = 240) -> list[str]:
    deadline = time.monotonic() + timeout
    names: list[str] = []
    while time.monotonic() < deadline:
        names = sorted(w for w in worker_ids() if w.startswith("decode"))
        if len(names) == n:
            return names
        time.sleep(0.5)
    raise AssertionError(f"decode workers {names}, wanted {n} within {timeout:g}s")


def test_scale_up_serves_then_drains(tmp_path: Path, ray_address: str) -> None:
    expected = expected_tokens()
    router = start_router(config(tmp_path), ray_address)
    try:
        port = router_port(router)
        rc, out = _scale(ray_address, "decode=2")
        assert rc == 0 and "desired replicas set on the running cluster: decode=2" in out, out
        assert len(_wait_decode_workers(2)) == 2
        wait_baseline(timeout=240)  # the new worker is up and healthy, its pool empty

        async def load() -> list[object]:
            return list(await asyncio.gather(*(stream(port, t) for t in PROMPTS * 2)))

        assert run(load()) == expected + expected

        async def drain_under_load() -> list[object]:
            jobs = [asyncio.create_task(stream(port, t)) for t in PROMPTS * 2]
            await asyncio.sleep(0.5)
            rc, out = await asyncio.to_thread(_scale, ray_address, "decode=1")
            assert rc == 0, out
            return list(await asyncio.gather(*jobs))

        assert run(drain_under_load()) == expected + expected
        assert len(_wait_decode_workers(1)) == 1
        wait_baseline()

        rc, out = _scale(ray_address, "decode=0")
        assert rc == 1 and "pool 'decode'" in out, out
    finally:
        assert router.stop() == 0, "\n".join(router.lines)
        stop = cli("stop", "--ray-address", ray_address, "--namespace", NAMESPACE, timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def test_scale_without_a_cluster_says_why(ray_address: str) -> None:
    rc, out = _scale(ray_address, "decode=2")
    assert rc == 1 and f"no batonserve cluster runs in Ray namespace {NAMESPACE!r}" in out, out
    rc, out = _scale("127.0.0.1:1", "decode=2")
    assert rc == 2 and "ray.address: cannot reach Ray at 127.0.0.1:1" in out, out

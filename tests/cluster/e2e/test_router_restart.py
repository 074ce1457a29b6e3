"""The cluster outlives its routers (issue 17): a router killed with SIGKILL under streams and
started again attaches to the running cluster in seconds, with the same worker actors; its
in-flight streams ended UNAVAILABLE (never hung, never other tokens); its abandoned requests are
aborted by the cluster's read lease, so every block pool returns to its baseline."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import grpc
import pytest
import ray
from testkit.router_attach import (
    MAX_TOKENS,
    NAMESPACE,
    PROMPTS,
    cluster_actor,
    config,
    expected_tokens,
    router_port,
    run,
    start_router,
    stream,
    wait_baseline,
    worker_ids,
)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    """The offline engine's tokens for PROMPTS."""
    return expected_tokens()


def test_router_sigkill_under_streams_then_reattach(
    tmp_path: Path, ray_address: str, expected: list[list[int]]
) -> None:
    cfg = config(tmp_path)
    first = start_router(cfg, ray_address)
    try:
        port = router_port(first)
        before = worker_ids()
        assert sorted(before) == ["decode-0", "prefill-0"]

        async def kill_under_streams() -> list[list[int] | grpc.StatusCode]:
            seen: list[list[int]] = [[] for _ in PROMPTS]
            tasks = [
                asyncio.ensure_future(stream(port, t, s))
                for t, s in zip(PROMPTS, seen, strict=True)
            ]
            deadline = time.monotonic() + 120
            while not all(len(s) >= 2 for s in seen) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert all(len(s) >= 2 for s in seen), f"streams did not start: {seen}"
            first.proc.send_signal(signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)  # none may hang

        outs = run(kill_under_streams())
        first.proc.wait(30)
    finally:
        first.stop()
    cut = 0
    for i, out in enumerate(outs):
        if isinstance(out, list):  # finished before the kill landed: must be whole and exact
            assert out == expected[i], f"stream {i}"
        else:
            assert out == grpc.StatusCode.UNAVAILABLE, f"stream {i} ended {out}"
            cut += 1
    assert cut, "the kill came after every stream had finished"

    t0 = time.monotonic()
    second = start_router(cfg, ray_address)
    try:
        port = router_port(second, timeout=120)
        attach_s = time.monotonic() - t0
        print(f"restarted router ready in {attach_s:.1f}s ({cut} stream(s) were cut)")
        assert worker_ids() == before, "a worker actor was recreated"
        assert any("attaching to the running batonserve cluster" in ln for ln in second.lines)
        assert not any("worker prefill-0 ready" in ln for ln in second.lines)  # nothing loaded
        got = run(stream(port, PROMPTS[0]))
        assert got == expected[0] and len(got) == MAX_TOKENS
        wait_baseline()  # the dead router's requests were aborted by the read lease
    finally:
        assert second.stop() == 0, "\n".join(second.lines)
    assert worker_ids() == before  # SIGTERM of an attached router leaves the cluster running
    assert any("left the cluster running" in ln for ln in second.lines)

    # The cluster actor itself dies under streams: they end UNAVAILABLE, saying so; none hangs.
    third = start_router(cfg, ray_address)
    try:
        port = router_port(third, timeout=120)
        errors: list[str] = []

        async def kill_cluster() -> list[list[int] | grpc.StatusCode]:
            seen: list[list[int]] = [[] for _ in PROMPTS]
            tasks = [
                asyncio.ensure_future(stream(port, t, s, errors=errors))
                for t, s in zip(PROMPTS, seen, strict=True)
            ]
            deadline = time.monotonic() + 120
            while not all(seen) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            ray.kill(cluster_actor(), no_restart=True)
            return await asyncio.wait_for(asyncio.gather(*tasks), 60)

        outs = run(kill_cluster())
        assert grpc.StatusCode.UNAVAILABLE in outs, outs
        for o, want in zip(outs, expected, strict=True):
            assert o in (grpc.StatusCode.UNAVAILABLE, want), outs
        assert all("batonserve cluster" in e and "is gone" in e for e in errors), errors
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _any_alive(before):
            time.sleep(0.2)
        assert not _any_alive(before), "workers outlived the cluster actor that owns them"
    finally:
        assert third.stop() == 0, "\n".join(third.lines)


def _any_alive(workers: dict[str, tuple[str, int]]) -> bool:
    for name in workers:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
            return True
        except ValueError:
            pass
    return False

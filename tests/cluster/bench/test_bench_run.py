"""`batonserve bench` against a router over the fake cluster (real sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from testkit.router_harness import CONTEXT_LENGTH, RouterHarness, fakes

from batonserve.cluster.bench.drivers import Connection
from batonserve.cluster.bench.report import SLO, summarize
from batonserve.cluster.bench.runner import BenchConfig, run_bench
from batonserve.cluster.bench.workload import LengthSpec, synthetic_requests, trace_requests
from batonserve.cluster.cli import main

Make = Callable[..., RouterHarness]


def _run(h: RouterHarness, requests: list, **kw: object) -> tuple[list, float]:
    cfg = BenchConfig(Connection(h.target, timeout_s=20), progress_interval_s=0, **kw)  # type: ignore[arg-type]
    return asyncio.run(run_bench(cfg, requests))


@pytest.mark.parametrize("protocol", ["native", "kserve"])
def test_closed_loop_counts_every_token(bench_router: Make, protocol: str) -> None:
    h = bench_router()
    reqs = synthetic_requests(12, LengthSpec(4, 10), LengthSpec(5, 5), None, seed=1)
    results, wall = _run(h, reqs, protocol=protocol, concurrency=4)
    assert [r.index for r in results] == list(range(12))
    assert all(r.ok for r in results), [r.code for r in results]
    assert all(r.output_tokens == 5 for r in results)
    assert all(len(r.tbt_s) == 4 for r in results)
    rep = summarize(results, wall, SLO())
    assert rep.completed == 12 and rep.errors == {}
    assert 0 < rep.ttft.p50 <= rep.ttft.p99 <= rep.e2e.p99
    assert rep.tbt.count == 48 and rep.output_token_rate == pytest.approx(60 / wall)
    # The cluster saw what was sent: synthetic prompts of the drawn lengths (native sends ids).
    sent = sorted(len(r.prompt_token_ids) for r in h.cluster.requests)
    if protocol == "native":
        assert sent == sorted(r.prompt_tokens for r in reqs)
    assert all(r.sampling.max_tokens == 5 and r.sampling.ignore_eos for r in h.cluster.requests)


def test_rejections_are_counted_by_code_and_miss_goodput(bench_router: Make) -> None:
    cfg = fakes.FakeClusterConfig(max_running=1, token_interval_s=0.02)
    h = bench_router(fake_config=cfg)
    reqs = synthetic_requests(8, LengthSpec(4, 4), LengthSpec(6, 6), None, seed=2)
    results, wall = _run(h, reqs, concurrency=4)
    rep = summarize(results, wall, SLO(ttft_s=10.0))
    assert rep.errors.get("RESOURCE_EXHAUSTED", 0) >= 1
    assert rep.completed + rep.errors["RESOURCE_EXHAUSTED"] == 8
    assert rep.goodput_fraction == pytest.approx(rep.completed / 8)
    strict = summarize(results, wall, SLO(ttft_s=1e-9))
    assert strict.goodput_rate == 0.0


def test_open_loop_follows_arrivals_and_duration_caps(bench_router: Make) -> None:
    h = bench_router()
    reqs = synthetic_requests(500, LengthSpec(3, 3), LengthSpec(2, 2), rate=20.0, seed=3)
    results, wall = _run(h, reqs, duration_s=0.6)
    assert 3 <= len(results) <= 30  # about 20/s for 0.6 s, never all 500
    assert wall < 5
    for r, req in zip(results, reqs, strict=False):
        assert r.start_s >= (req.arrival_s or 0) - 1e-3  # never early
    assert all(r.ok for r in results)


def test_trace_replay_scales_time_and_lengths(bench_router: Make) -> None:
    reqs = trace_requests("code", 6, time_scale=0.01, length_scale=0.01, rate=None, seed=0)
    assert reqs[0].arrival_s == 0 and all(r.prompt_tokens >= 1 for r in reqs)
    arrivals = [r.arrival_s or 0.0 for r in reqs]
    assert arrivals == sorted(arrivals) and arrivals[-1] < 2
    h = bench_router()
    results, _ = _run(h, reqs)
    assert all(r.ok for r in results), [r.code for r in results]
    for r, req in zip(results, reqs, strict=True):
        assert r.start_s >= (req.arrival_s or 0) - 1e-3
        assert r.output_tokens == min(req.output_tokens, CONTEXT_LENGTH - 1)


def test_cli_rate_sweep_writes_json_and_plots(bench_router: Make, tmp_path: Path) -> None:
    h = bench_router()
    out, plots = tmp_path / "bench.json", tmp_path / "plots"
    argv = ["bench", "--target", h.target, "--rate", "40,80", "--num-requests", "8"]
    argv += ["--prompt-len", "4:8", "--output-len", "3", "--slo-ttft-ms", "5000"]
    argv += ["--json", str(out), "--plot", str(plots), "--progress-interval", "0"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert [run["offered_rate"] for run in doc["runs"]] == [40.0, 80.0]
    for run in doc["runs"]:
        assert run["completed"] == 8 and run["errors"] == {}
        assert run["goodput_fraction"] == 1.0
        assert len(run["per_request"]) == 8
        assert all(p["output_tokens"] == 3 for p in run["per_request"])
        assert run["ttft"]["p50"] > 0 and not math.isnan(run["e2e"]["p99"])
    assert (plots / "latency_cdf.png").stat().st_size > 1000
    assert (plots / "throughput_vs_rate.png").stat().st_size > 1000


def test_cli_auth_token_from_file(
    bench_router: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h = bench_router(token="t0ken")
    base = ["bench", "--target", h.target, "--num-requests", "3", "--output-len", "2"]
    base += ["--prompt-len", "3", "--progress-interval", "0"]
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    assert main([*base, "--token-file", str(token)]) == 0
    assert "3/3 completed" in capsys.readouterr().out
    # GetModelInfo (prepare) is refused first: one clear line, no traceback.
    assert main(base) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_progress_goes_to_stderr(bench_router: Make) -> None:
    h = bench_router(fake_config=fakes.FakeClusterConfig(token_interval_s=0.05))
    reqs = synthetic_requests(2, LengthSpec(3, 3), LengthSpec(8, 8), None, seed=4)
    err = io.StringIO()
    cfg = BenchConfig(Connection(h.target, timeout_s=20), progress_interval_s=0.1)
    results, _ = asyncio.run(run_bench(cfg, reqs, err))
    assert all(r.ok for r in results)
    assert "sent " in err.getvalue() and "in flight" in err.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rate", "0"], "--rate"),
        (["--rate", "1", "--concurrency", "2"], "not both"),
        (["--prompt-len", "9:3"], "--prompt-len"),
        (["--num-requests", "0"], "--num-requests"),
        (["--trace", "code", "--time-scale", "0"], "--time-scale"),
    ],
)
def test_cli_user_errors_name_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Errors found before any connection: the target is never dialled.
    assert main(["bench", "--target", "127.0.0.1:1", *argv]) == 2
    assert message in capsys.readouterr().err

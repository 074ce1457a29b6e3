"""`batonserve bench` machinery against the router over the paced fake cluster (another process):
a Poisson rate sweep past capacity, then closed-loop concurrency, on both protocols.

    python tests/bench/bench_load.py [--rates 5,10,20,40,80] [--requests 120] [--plot DIR]

The fake runs at most 8 requests at once and paces tokens (10 ms), so capacity is known:
8 / (32 tokens x 10 ms) = 25 req/s. Above it, admission refuses (RESOURCE_EXHAUSTED) and the
admitted requests keep their pace. For a real server: `batonserve bench --target HOST:PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the testkit package

from testkit import TESTS
from testkit.router_harness import write_tiny_model

from batonserve.cluster.bench.drivers import Connection, RequestResult
from batonserve.cluster.bench.plots import write_plots
from batonserve.cluster.bench.report import SLO, BenchReport, summarize
from batonserve.cluster.bench.runner import BenchConfig, run_bench
from batonserve.cluster.bench.workload import LengthSpec, synthetic_requests

INTERVAL_S = 0.01
OUTPUT = 32
SLO_ = SLO(ttft_s=0.1, tbt_s=0.02)


def start_server(model_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """testkit.fake_server (router + paced fake cluster, 8 running at most) on a free port."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testkit.fake_server",
            str(model_dir),
            "1",
            str(INTERVAL_S),
            "512",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=TESTS,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
    raise SystemExit("server did not start")


def row(rep: BenchReport, protocol: str) -> str:
    """One markdown table row."""
    ms = lambda x: f"{x * 1000:.1f}"  # noqa: E731
    errors = ", ".join(f"{k} {v}" for k, v in sorted(rep.errors.items())) or "-"
    return (
        f"| {protocol} | {rep.label} | {rep.request_rate:.1f} | {rep.goodput_rate:.1f} | "
        f"{rep.output_token_rate:.0f} | {ms(rep.ttft.p50)} / {ms(rep.ttft.p99)} | "
        f"{ms(rep.tbt.p50)} / {ms(rep.tbt.p99)} | {ms(rep.e2e.p50)} / {ms(rep.e2e.p99)} | "
        f"{errors} |"
    )


async def sweep(
    target: str, args: argparse.Namespace
) -> list[tuple[str, BenchReport, list[RequestResult]]]:
    out = []
    conn = Connection(target, timeout_s=30)
    for protocol in ("native", "kserve"):
        for rate in [float(r) for r in args.rates.split(",")]:
            reqs = synthetic_requests(
                args.requests, LengthSpec(16, 64), LengthSpec(OUTPUT, OUTPUT), rate, seed=1
            )
            cfg = BenchConfig(conn, protocol=protocol, duration_s=60, progress_interval_s=0)  # type: ignore[arg-type]
            results, wall = await run_bench(cfg, reqs)
            out.append(
                (protocol, summarize(results, wall, SLO_, f"rate={rate:g}/s", rate), results)
            )
        for conc in (1, 8, 32):
            reqs = synthetic_requests(
                args.requests, LengthSpec(16, 64), LengthSpec(OUTPUT, OUTPUT), None, seed=2
            )
            cfg = BenchConfig(
                conn, protocol=protocol, concurrency=conc, duration_s=60, progress_interval_s=0
            )  # type: ignore[arg-type]
            results, wall = await run_bench(cfg, reqs)
            out.append((protocol, summarize(results, wall, SLO_, f"concurrency={conc}"), results))
    return out


def main() -> None:
    """Run the sweep and print a markdown table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rates", default="5,10,20,40,80")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--plot", help="write latency_cdf.png and throughput_vs_rate.png (native)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, target = start_server(write_tiny_model(Path(tmp) / "model"))
        try:
            runs = asyncio.run(sweep(target, args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    print(
        f"fake cluster: 8 running at most, {INTERVAL_S * 1000:g} ms/token, {OUTPUT} tokens out, "
        f"prompts 16-64 tokens; capacity {8 / (OUTPUT * INTERVAL_S):g} req/s; "
        f"SLO TTFT<= {SLO_.ttft_s * 1000:g} ms, mean TBT <= {SLO_.tbt_s * 1000:g} ms"
    )
    print(
        "| protocol | load | req/s | goodput req/s | out tok/s | TTFT P50 / P99 ms | "
        "TBT P50 / P99 ms | E2E P50 / P99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for protocol, rep, _ in runs:
        print(row(rep, protocol))
    if args.plot:
        native = [(rep, res) for proto, rep, res in runs if proto == "native"]
        for path in write_plots(native, args.plot):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()

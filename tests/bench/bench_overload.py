"""Overload at ten times capacity: how fast refusals come back and how admitted streams fare.

    python3 tests/bench/bench_overload.py [--capacity 8] [--waves 4] [--interval 0.01]

The router in-process over the fake cluster (paced tokens, `capacity` running at most), hit by
waves of 10 x capacity concurrent requests. Per wave it prints the refusals' latency (p50, p99),
the admitted streams' worst TTFT and median TBT against the pacing interval, and the process RSS.
tests/cluster/faults/test_faults_fake.py checks the same storm for correctness (codes, counts,
every token, bounded memory); the latencies are figures for this page, not unit-test thresholds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the testkit package

from testkit.router_harness import fakes, reply_script, router_factory, write_tiny_model

from batonserve.cluster.bench.drivers import Connection
from batonserve.cluster.bench.report import percentile
from batonserve.cluster.bench.runner import BenchConfig, run_bench
from batonserve.cluster.bench.workload import LengthSpec, synthetic_requests
from batonserve.workers.tokenizer import Tokenizer


def rss_mib() -> float:
    """This process's resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity", type=int, default=8, help="requests running at most")
    ap.add_argument("--waves", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between tokens")
    ap.add_argument("--output-len", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(write_tiny_model(Path(tmp)) / "tokenizer.json")
        run(tok, args)


def run(tok: Tokenizer, args: argparse.Namespace) -> None:
    """Every wave against one router; a table row each."""
    cap, interval, out_len = args.capacity, args.interval, args.output_len
    with router_factory(tok) as make:
        h = make(
            fake_config=fakes.FakeClusterConfig(
                num_blocks=4096, max_running=cap, token_interval_s=interval
            ),
            script=reply_script(tok, repeat=4),
        )
        cfg = BenchConfig(
            Connection(h.target, timeout_s=30), concurrency=10 * cap, progress_interval_s=0
        )
        print(f"capacity {cap}, {10 * cap} concurrent per wave, {out_len} tokens every {interval}s")
        print(
            "| wave | admitted | refused | refusal p50 / p99 ms | admitted TTFT max ms "
            "| TBT p50 ms (paced) | RSS MiB |"
        )
        print("|---|---|---|---|---|---|---|")
        for wave in range(args.waves):
            reqs = synthetic_requests(
                10 * cap, LengthSpec(4, 4), LengthSpec(out_len, out_len), None, seed=wave
            )
            results, _ = asyncio.run(run_bench(cfg, reqs))
            h.wait_for(lambda: h.cluster.used_blocks == 0 and not h.cluster.running, timeout=10)
            ok = [r for r in results if r.ok]
            refused = [r.e2e_s * 1000 for r in results if not r.ok]
            ttft = max((r.ttft_s or 0) for r in ok) * 1000 if ok else float("nan")
            tbts = [g * 1000 for r in ok for g in r.tbt_s]
            p50 = percentile(refused, 50) if refused else float("nan")
            p99 = percentile(refused, 99) if refused else float("nan")
            tbt = percentile(tbts, 50) if tbts else float("nan")
            print(
                f"| {wave} | {len(ok)} | {len(refused)} | {p50:.1f} / {p99:.1f} | {ttft:.1f} "
                f"| {tbt:.1f} ({interval * 1000:.0f}) | {rss_mib():.0f} |"
            )


if __name__ == "__main__":
    main()

"""Cost of the metrics module on the router's hot path, with and without the Ray mirror.

Run: python3 tests/bench/bench_metrics.py [--ray] [--requests N]
Prints microseconds per request (admit, start, first token, 63 gaps, finish), per worker
snapshot, and per /metrics render with 16 workers.
"""

from __future__ import annotations

import argparse
import os
import time

from batonserve.cluster.metrics import Metrics, RequestFinished, WorkerSnapshot

TOKENS = 64
WORKERS = 16


def _requests(m: Metrics, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        m.request_admitted()
        m.request_started(0.01)
        m.first_token(0.05)
        for _ in range(TOKENS - 1):
            m.inter_token(0.02)
        m.request_finished(RequestFinished("OK", "stop", 128, TOKENS, 16, 1.5, started=True))
    return (time.perf_counter() - t0) / n * 1e6


def _snapshots(m: Metrics, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        w = i % WORKERS
        m.worker_snapshot(
            WorkerSnapshot(f"decode-{w}", "decode", "decode", 0.5, 8, 1, i * 10, i * 5, 100, i)
        )
    return (time.perf_counter() - t0) / n * 1e6


def _render(m: Metrics, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        m.exposition()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    """Print the figures."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ray", action="store_true", help="also record into ray.util.metrics")
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    if args.ray:
        import ray

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        m = Metrics("demo")
        print(f"ray mirror: {m.ray_mirrored}")
        print(f"us per request ({TOKENS} tokens): {_requests(m, args.requests):.1f}")
        print(f"us per worker snapshot: {_snapshots(m, args.requests):.1f}")
        print(f"us per /metrics render ({WORKERS} workers): {_render(m, 200):.1f}")
    finally:
        if args.ray:
            ray.shutdown()


if __name__ == "__main__":
    main()

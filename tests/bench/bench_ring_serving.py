"""Time to first token of a long prompt through the live cluster: one prefill worker vs a ring
group of 2 and 3 (sequence-parallel prefill), measured side by side in one local Ray cluster.

    python3 tests/bench/bench_ring_serving.py --length 1536 --repeats 5

Prints one row per mode: median TTFT, and the members' summed attention compute/communication
time and hidden fraction from their SP reports.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import time
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.config import EngineConfig
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.sp_serving.config import SequenceParallelConfig
from batonserve.workers.sp_serving.report import SPStepReport


class Reports:
    """Observer keeping SP reports (everything else ignored)."""

    def __init__(self) -> None:
        self.sp: list[SPStepReport] = []

    def worker_snapshot(self, snap: Any) -> None:
        """Ignored."""

    def worker_restarted(self, pool: str, worker: str) -> None:
        """Ignored."""

    def kv_handoff(self, rec: Any) -> None:
        """Ignored."""

    def pool_change(self, change: Any) -> None:
        """Ignored."""

    def sequence_parallel(self, report: SPStepReport) -> None:
        """Keep it."""
        self.sp.append(report)

    def iteration_tokens(self, worker: str, pool: str, tokens: tuple[int, ...]) -> None:
        """Ignored."""


async def ttft(cluster: Cluster, rid: str, prompt: list[int]) -> float:
    """Seconds from submit to the first streamed token (the rest is drained)."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    first = 0.0
    async for d in cluster.generate(GenerateRequest(rid, tuple(prompt), params)):
        if d.token_ids and not first:
            first = time.perf_counter() - t0
    return first


async def main(args: argparse.Namespace) -> None:
    sp = SequenceParallelConfig(
        enabled=True, threshold_tokens=64, tokens_per_rank=64, max_group_size=3
    )
    engine = EngineConfig(device="cpu", num_kv_blocks=1024, max_num_batched_tokens=args.length)
    cfg = ServeConfig(
        model="demo",
        ray=RayConfig(num_cpus=8, include_dashboard=False, namespace="bench-ring"),
        engine=engine,
        pools=(
            PoolConfig(name="prefill", role="prefill", replicas=3, num_cpus=1),
            PoolConfig(name="decode", role="decode", replicas=1, num_cpus=1),
        ),
        scheduler=SchedulerConfig(
            conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
        ),
        sequence_parallel=sp,
    )
    obs = Reports()
    cluster = await start_cluster(cfg, lambda _: None, observer=obs)
    ring = cluster.controller.ring
    assert ring is not None and ring.ready
    modes = {
        "single worker": dataclasses.replace(sp, enabled=False),
        "ring of 2": dataclasses.replace(sp, max_group_size=2),
        "ring of 3": sp,
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    reports: dict[str, list[SPStepReport]] = {m: [] for m in modes}
    try:
        for rep in range(args.repeats + 1):  # the first round warms every path up
            for name, mode_cfg in modes.items():
                ring.sp = mode_cfg
                prompt = [3 + (rep * 31 + j * 7) % 500 for j in range(args.length)]
                obs.sp.clear()
                t = await ttft(cluster, f"{name}-{rep}", prompt)
                await asyncio.sleep(0.7)  # a poll round: the members' reports arrive
                if rep:
                    times[name].append(t)
                    reports[name] += obs.sp
    finally:
        await cluster.shutdown()
    print(f"prompt {args.length} tokens, demo model, {os.cpu_count()} cores, torch threads default")
    print("| mode | median TTFT (s) | attn compute (s) | comm (s) | exposed comm (s) | hidden |")
    print("|---|---|---|---|---|---|")
    for name in modes:
        rs = reports[name]
        comp = sum(r.compute_s for r in rs) / max(1, args.repeats)
        comm = sum(r.comm_s for r in rs) / max(1, args.repeats)
        exp = sum(r.exposed_comm_s for r in rs) / max(1, args.repeats)
        hidden = f"{1 - exp / comm:.2f}" if comm > 0 else "-"
        print(
            f"| {name} | {statistics.median(times[name]):.3f} | {comp:.3f} | {comm:.3f} "
            f"| {exp:.3f} | {hidden} |"
        )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=5)
    asyncio.run(main(p.parse_args()))

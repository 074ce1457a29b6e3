"""Served expert parallelism against one process per worker, side by side in one local Ray.

    python3 tests/bench/bench_ep_serving.py [--requests 8] [--new-tokens 32] [--rounds 3]

One prefill and one decode worker serve demo-moe; the same concurrent greedy requests run with
`engine.expert_parallel_size` 1 and 2, rounds alternating between the two clusters. Prints decode
throughput and time per output token for each, their ratio, and whether the tokens match.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.workload import corpus_chunks
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.sampling_params import SamplingParams

MODEL = "demo-moe"


def config(ep: int, namespace: str) -> ServeConfig:
    """One prefill + one decode worker, every request disaggregated."""
    engine = EngineConfig(device="cpu", num_kv_blocks=256, expert_parallel_size=ep)
    return ServeConfig(
        model=MODEL,
        ray=RayConfig(num_cpus=8, include_dashboard=False, namespace=namespace),
        engine=engine,
        pools=(
            PoolConfig(name="prefill", role="prefill", num_cpus=0.5),
            PoolConfig(name="decode", role="decode", num_cpus=0.5),
        ),
        scheduler=SchedulerConfig(
            conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
        ),
    )


async def one_round(
    cluster: Cluster, tag: str, prompts: list[list[int]], params: SamplingParams
) -> tuple[float, list[list[int]]]:
    """Seconds from the first token of any request to the last token of all, and the tokens."""
    firsts: list[float] = []

    async def run(i: int, prompt: list[int]) -> list[int]:
        toks: list[int] = []
        async for d in cluster.generate(GenerateRequest(f"{tag}-{i}", tuple(prompt), params)):
            if not toks and d.token_ids:
                firsts.append(time.perf_counter())
            toks += d.token_ids
        return toks

    tokens = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)))
    return time.perf_counter() - min(firsts), list(tokens)


async def main_async(args: argparse.Namespace) -> None:
    """Start both clusters, alternate rounds, print the figures."""
    prompts = corpus_chunks(resolve_model_dir(MODEL), "heldout", args.requests, args.prompt_len)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    clusters = {}
    for ep in (1, 2):  # the first starts Ray on 127.0.0.1, the second joins it
        print(f"starting the cluster with expert_parallel_size={ep} ...", flush=True)
        clusters[ep] = await start_cluster(config(ep, f"bench-ep{ep}"), lambda _: None)
    times: dict[int, list[float]] = {1: [], 2: []}
    outputs: dict[int, list[list[int]]] = {}
    try:
        for r in range(args.rounds + 1):  # round 0 warms both up (not counted)
            for ep, cluster in clusters.items():
                dt, outputs[ep] = await one_round(cluster, f"r{r}", prompts, params)
                if r:
                    times[ep].append(dt)
                    print(f"  round {r} ep={ep}: {dt:.2f} s", flush=True)
    finally:
        for ep in sorted(clusters, reverse=True):  # the one that started Ray stops it, last
            await clusters[ep].shutdown()
    decoded = args.requests * (args.new_tokens - 1)
    for ep in (1, 2):
        med = statistics.median(times[ep])
        print(f"ep={ep}: {decoded / med:.1f} decode tok/s, {1e3 * med / decoded:.2f} ms/token")
    ratio = statistics.median(times[2]) / statistics.median(times[1])
    print(f"time ep=2 / ep=1: {ratio:.2f}; same tokens: {outputs[1] == outputs[2]}")


def main() -> None:
    """Parse the arguments and run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()

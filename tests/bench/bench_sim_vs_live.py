"""The simulator against the live cluster: the same short trace replayed on both, latencies side by side.

    python tests/bench/bench_sim_vs_live.py                      # profile, replay, simulate
    python tests/bench/bench_sim_vs_live.py --profile demo.csv   # reuse a `batonserve profile` table

1. Profile the demo engine in this process (`batonserve profile`'s code, one torch thread: a
   Ray worker runs with one thread too), unless --profile names a table.
2. Take the first --requests requests of the Azure code trace, scale prompt lengths by
   --prompt-scale (the demo model's context is 2048 tokens, the trace's median prompt 1,469),
   cap outputs at --max-output, and re-time them to a Poisson rate this CPU can serve.
3. Replay them on a live cluster started in-process (`start_cluster`: local Ray on 127.0.0.1,
   the demo model, one prefill and one decode worker, the default scheduler) through the
   Cluster API, in real time; time the first and last token of each request.
4. Simulate the same arrivals on the same design (1 prefill + 1 decode, the workers' engine
   limits and KV capacity, the same scheduler config) with the profile as performance model.
5. Print TTFT, TBT (mean per request after the first token) and E2E at P50/P90, live and
   simulated, with sim/live ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from batonserve.cluster.sim.trace import TraceRequest, load_azure_trace, retime_poisson


@dataclass(frozen=True)
class Latency:
    """One request's measured (or simulated) latencies, in seconds."""

    ttft: float
    tbt: float
    e2e: float


def make_trace(args: argparse.Namespace) -> list[TraceRequest]:
    """The code trace's first requests, scaled to the demo model and re-timed."""
    trace = load_azure_trace("code", limit=args.requests)
    scaled = [
        replace(
            r,
            prompt_tokens=max(8, min(args.max_prompt, round(r.prompt_tokens * args.prompt_scale))),
            output_tokens=max(2, min(args.max_output, r.output_tokens)),
        )
        for r in trace
    ]
    return retime_poisson(scaled, args.rate, seed=args.seed)


def profile(args: argparse.Namespace, out: Path) -> Path:
    """Write the demo engine's profile table to `out` (or return the one given)."""
    if args.profile:
        return Path(args.profile)
    import torch

    from batonserve.cluster.cli_profile import profile_engine
    from batonserve.cluster.sim.perf_model import write_table
    from batonserve.workers.engine import Engine

    torch.set_num_threads(1)
    eng = Engine.from_model(
        "demo", device="cpu", max_num_batched_tokens=2048, enable_prefix_caching=False
    )
    points = [(p, 1) for p in (16, 64, 128, 256, 512, 1024)] + [(64, b) for b in (2, 4, 8)]
    t0 = time.perf_counter()
    rows = profile_engine(eng, "demo", "cpu", points, 8, args.repeats)
    write_table(out, rows)
    print(f"profiled {len(rows)} rows in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    del eng
    return out


async def replay_live(trace: list[TraceRequest]) -> tuple[dict[str, Latency], int, str]:
    """Real-time replay on a fresh in-process cluster; latencies, KV tokens per worker, pairings."""
    from batonserve.cluster.api import GenerateRequest
    from batonserve.cluster.config import RayConfig, ServeConfig
    from batonserve.cluster.runtime import start_cluster
    from batonserve.workers.sampling_params import SamplingParams

    cfg = ServeConfig(ray=RayConfig(num_cpus=4, include_dashboard=False))
    t0 = time.perf_counter()
    cluster = await start_cluster(cfg, lambda m: print(f"  {m}", flush=True))
    print(f"cluster up in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        # Wait for the first stats, so the scheduler sees real KV sizes from the start.
        while any(h.stats is None for h in cluster.controller.workers.values()):
            await asyncio.sleep(0.1)
        s = next(iter(cluster.controller.workers.values())).stats
        assert s is not None
        kv_tokens = s.num_blocks * s.block_size
        vocab = cluster.model_info().vocab_size
        out: dict[str, Latency] = {}
        modes: list[str] = []

        async def one(i: int, r: TraceRequest, start: float) -> None:
            await asyncio.sleep(max(0.0, start + r.arrival_s - time.perf_counter()))
            prompt = tuple(3 + (i * 7919 + k * 131) % (vocab - 3) for k in range(r.prompt_tokens))
            params = SamplingParams(max_tokens=r.output_tokens, temperature=0, ignore_eos=True)
            t_in = time.perf_counter()
            first = last = -1.0
            n = 0
            async for d in cluster.generate(GenerateRequest(r.request_id, prompt, params)):
                if d.token_ids:
                    last = time.perf_counter()
                    first = last if first < 0 else first
                    n += len(d.token_ids)
            assert n == r.output_tokens, (r.request_id, n)
            tbt = (last - first) / (n - 1) if n > 1 else 0.0
            out[r.request_id] = Latency(first - t_in, tbt, last - t_in)

        from batonserve.cluster.scheduling import DecisionLog, Pairing

        log = DecisionLog()
        cluster.cls.recorder = log
        start = time.perf_counter()
        await asyncio.gather(*(one(i, r, start) for i, r in enumerate(trace)))
        print(f"live replay took {time.perf_counter() - start:.0f} s", flush=True)
        modes = [d.mode for d in log.decisions() if isinstance(d, Pairing)]
        pairing = (
            f"{modes.count('disaggregated')} disaggregated, {modes.count('in_place')} in place"
        )
        return out, kv_tokens, pairing
    finally:
        await cluster.shutdown()


def simulate(
    trace: list[TraceRequest], table: Path, kv_tokens: int
) -> tuple[dict[str, Latency], str]:
    """The same arrivals on the simulated 1 prefill + 1 decode design with the engine profile."""
    from batonserve.cluster.config import ServeConfig
    from batonserve.cluster.sim.design import Design, PoolSpec
    from batonserve.cluster.sim.hardware import MachineSpec, model_spec_from_hf
    from batonserve.cluster.sim.perf_model import TablePerfModel
    from batonserve.cluster.sim.simulator import SimConfig, Simulator
    from batonserve.cluster.sim.worker import EngineLimits
    from batonserve.workers.models.paths import resolve_model_dir

    cfg = ServeConfig()
    perf = TablePerfModel.from_csv(table, "demo", "cpu")
    model = model_spec_from_hf(resolve_model_dir("demo"))
    # KV moves between two processes on one host (gloo over loopback): ~1 GB/s is generous, and
    # a demo prompt's KV is ~1 MB, so the link hardly matters.
    cpu = MachineSpec("cpu", 1.0, 100.0, link_gb_per_s=1.0, kv_capacity_tokens=kv_tokens)
    design = Design(
        "live", (PoolSpec("prefill", "prefill", "cpu", 1), PoolSpec("decode", "decode", "cpu", 1))
    )
    sim_cfg = SimConfig(cfg.scheduler, EngineLimits.from_engine_config(cfg.engine))
    res = Simulator(design, model, {"cpu": cpu}, {"cpu": perf}, sim_cfg).run(trace)
    out = {r.request_id: Latency(r.ttft, r.tbt, r.e2e) for r in res.records if r.finish_s >= 0}
    modes = [r.mode for r in res.records]
    return out, f"{modes.count('disaggregated')} disaggregated, {modes.count('in_place')} in place"


def pct(xs: list[float], q: int) -> float:
    """The q-th percentile (inclusive method, as the simulator's summary)."""
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def report(live: dict[str, Latency], before: dict[str, Latency], after: dict[str, Latency]) -> None:
    """Side-by-side P50/P90 and sim/live ratios, with the profile taken before and after."""
    ids = sorted(live)
    assert set(ids) == set(before) == set(after), "every request must complete on all sides"
    print(
        f"\n{'metric':<6} {'q':>3} {'live ms':>9} {'sim ms':>9} {'sim/live':>9}"
        f" {'sim* ms':>9} {'sim*/live':>9}   (sim*: profile taken after the replay)"
    )
    for name in ("ttft", "tbt", "e2e"):
        lv = [getattr(live[i], name) for i in ids]
        bv = [getattr(before[i], name) for i in ids]
        av = [getattr(after[i], name) for i in ids]
        for q in (50, 90):
            a, b, c = pct(lv, q), pct(bv, q), pct(av, q)
            print(
                f"{name.upper():<6} p{q:<2} {a * 1e3:9.1f} {b * 1e3:9.1f} {b / a:9.2f}"
                f" {c * 1e3:9.1f} {c / a:9.2f}"
            )


def main() -> None:
    """Profile, replay live, simulate, compare."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    p.add_argument("--prompt-scale", type=float, default=0.25)
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="", help="reuse this profile table (skip profiling)")
    p.add_argument("--table", default="/tmp/batonserve_demo_profile.csv", help="where to write it")
    p.add_argument("--repeats", type=int, default=2, help="profile runs per grid point")
    p.add_argument("--max-load", type=float, default=1e9, help="wait for a 1-min load below this")
    p.add_argument("--wait-load-s", type=float, default=0.0, help="...for at most this long")
    args = p.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.wait_load_s
    while os.getloadavg()[0] > args.max_load and time.perf_counter() < deadline:
        time.sleep(5)  # the VM is shared: start when it is quieter, within a bound
    table = profile(args, Path(args.table))
    trace = make_trace(args)
    prompts = sorted(r.prompt_tokens for r in trace)
    print(
        f"{len(trace)} requests at {args.rate} req/s over {trace[-1].arrival_s:.0f} s; prompt "
        f"median {prompts[len(prompts) // 2]} (max {prompts[-1]}), output median "
        f"{sorted(r.output_tokens for r in trace)[len(trace) // 2]} tokens; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    live, kv_tokens, live_modes = asyncio.run(replay_live(trace))
    # Profiled again right after: the machine's load during the replay lies between the two.
    table_after = profile(args, Path(args.table).with_suffix(".after.csv"))
    sim, sim_modes = simulate(trace, table, kv_tokens)
    sim_after, _ = simulate(trace, table_after, kv_tokens)
    print(f"pairings: live {live_modes}; simulated {sim_modes}")
    report(live, sim, sim_after)
    print(f"\nwhole bench {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

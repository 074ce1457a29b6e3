"""Simulator benchmarks: speed on the full code trace, Splitwise's iso-cost/iso-power comparison,
and the simulator against the in-process engine it models.

    python tests/bench/bench_sim.py speed
    python tests/bench/bench_sim.py bisect --design Baseline-A:70 --requests 5000
    python tests/bench/bench_sim.py compare --requests 1000 --plots docs/img/simulator
    python tests/bench/bench_sim.py engine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from batonserve.cluster.scheduling import SchedulerConfig
from batonserve.cluster.sim.design import SPLITWISE_FAMILIES, Design, PoolSpec, make_design
from batonserve.cluster.sim.hardware import (
    DEFAULT_MACHINES,
    DEFAULT_MODELS,
    MachineSpec,
    model_spec_from_hf,
)
from batonserve.cluster.sim.metrics import Reference, summarize
from batonserve.cluster.sim.perf_model import SPLITWISE_TABLE, TablePerfModel
from batonserve.cluster.sim.planner import PlanRow, PlanSetup, isoline_ratio, plan_throughput
from batonserve.cluster.sim.simulator import SimConfig, Simulator
from batonserve.cluster.sim.trace import LengthDist, load_azure_trace, synthetic_trace
from batonserve.cluster.sim.worker import EngineLimits

LLAMA = DEFAULT_MODELS["llama2-70b"]


def _perf() -> dict[str, TablePerfModel]:
    return {
        m: TablePerfModel.from_csv(SPLITWISE_TABLE, "llama2-70b", m, 8) for m in DEFAULT_MACHINES
    }


def speed(args: argparse.Namespace) -> None:
    """Requests simulated per second on the whole code trace (its own timestamps)."""
    perf = _perf()
    trace = load_azure_trace("code")
    print(f"code trace: {len(trace)} requests over {trace[-1].arrival_s:.0f} s")
    for design in (make_design("Splitwise-HA", 2, 2), make_design("Baseline-A", 5)):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = Simulator(design, LLAMA, DEFAULT_MACHINES, perf).run(trace)
            best = min(best, time.perf_counter() - t0)
        s = summarize(res, Reference(perf["a100-80gb"]), DEFAULT_MACHINES)
        print(
            f"{design.label:<22} {len(trace) / best:8.0f} requests/s simulated "
            f"({best:.2f} s, {res.num_events} events, {res.num_events / best:.0f} events/s); "
            f"TTFT p50 {s.ttft.p50 * 1e3:.0f} ms, E2E p99 {s.e2e.p99:.2f} s"
        )


def bisect(args: argparse.Namespace) -> None:
    """One design's full max-rate bisection at the paper's scale: wall time, runs, load average."""
    import os

    from batonserve.cluster.sim import planner
    from batonserve.cluster.sim.paper import plan_setup

    fam, _, counts = args.design.partition(":")
    nums = [int(x) for x in counts.split("+")]
    design = make_design(fam, *nums)
    setup = plan_setup(
        args.setting, load_azure_trace("code", limit=args.requests), model=args.model
    )
    runs: list[tuple[float, bool, float, float]] = []
    evaluate = planner.evaluate

    def timed(*a, **k):  # type: ignore[no-untyped-def]
        t, c = time.perf_counter(), time.process_time()
        out = evaluate(*a, **k)
        runs.append((a[2], out[0].slo_met, time.perf_counter() - t, time.process_time() - c))
        return out

    planner.evaluate = timed  # type: ignore[assignment]
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    row = planner.max_rate(setup, design, iters=12)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    planner.evaluate = evaluate  # type: ignore[assignment]
    for rate, ok, dt, dc in runs:
        print(f"  {rate:7.2f} req/s {'pass' if ok else 'fail'} {dt:5.1f} s ({dc:5.1f} s CPU)")
    # CPU time is what the bisection costs on an idle core; wall time includes the other jobs.
    print(
        f"{design.label} ({args.setting}, {args.model}, {args.requests} requests): "
        f"{row.max_rate:.2f} req/s in {wall:.1f} s wall, {cpu:.1f} s CPU, {len(runs)} runs; "
        f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}"
    )


def _table(title: str, rows: list[PlanRow]) -> None:
    print(f"\n{title}")
    print(f"{'design':<26} {'$/h':>7} {'kW':>6} {'req/s in SLO':>13}")
    for r in rows:
        print(
            f"{r.design.label:<26} {r.cost_per_hour:7.1f} {r.power_w / 1e3:6.1f} {r.max_rate:13.2f}"
        )


def _best_by_family(rows: list[PlanRow]) -> dict[str, PlanRow]:
    best: dict[str, PlanRow] = {}
    for r in rows:
        if r.design.family not in best or r.max_rate > best[r.design.family].max_rate:
            best[r.design.family] = r
    return best


def compare(args: argparse.Namespace) -> None:
    """Throughput within Splitwise's SLOs of every family at the same cost, then the same power."""
    perf = _perf()
    setup = PlanSetup(
        LLAMA,
        DEFAULT_MACHINES,
        perf,
        Reference(perf["a100-80gb"]),
        load_azure_trace("code", limit=args.requests),
    )
    t0 = time.time()

    def progress(msg: str) -> None:
        print(f"  [{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    fams = list(SPLITWISE_FAMILIES)
    budget = args.baseline_machines * DEFAULT_MACHINES["a100-80gb"].cost_per_hour
    iso_cost = plan_throughput(setup, fams, budget, 0.0, args.max_designs, args.iters, progress)
    power = args.baseline_machines * DEFAULT_MACHINES["h100-80gb"].power_w
    iso_power = plan_throughput(setup, fams, 1e9, power, args.max_designs, args.iters, progress)
    for title, rows in (
        (f"iso-cost (${budget:.0f}/h)", iso_cost),
        (f"iso-power ({power / 1e3:.0f} kW)", iso_power),
    ):
        best = _best_by_family(rows)
        _table(f"{title}: best design per family", [best[f] for f in fams if f in best])
        for base in ("Baseline-A", "Baseline-H"):
            ratios = ", ".join(f"{f} {isoline_ratio(rows, f, base):.2f}x" for f in fams[:4])
            print(f"  vs {base}: {ratios}")
    if args.plots:
        from batonserve.cluster.sim.plots import plot_latency_cdf, plot_throughput_vs_cost

        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        plot_throughput_vs_cost(iso_cost, out / "isocost_throughput_vs_cost.png")
        plot_latency_cdf(iso_cost, out / "isocost_latency_cdf.png")
        plot_throughput_vs_cost(iso_power, out / "isopower_throughput_vs_cost.png")
        print(f"plots in {out}")
    print(f"\ncompare took {time.time() - t0:.0f} s")


def engine(args: argparse.Namespace) -> None:
    """Replay a short trace on the in-process engine in real time and in the simulator."""
    import torch

    from batonserve.cluster.cli_profile import profile_engine
    from batonserve.cluster.sim.perf_model import write_table
    from batonserve.workers.engine import Engine
    from batonserve.workers.models.paths import resolve_model_dir
    from batonserve.workers.sampling_params import SamplingParams

    torch.set_num_threads(1)
    eng = Engine.from_model("demo", device="cpu", enable_prefix_caching=False)
    points = [(p, 1) for p in (16, 32, 64, 128, 256, 512, 1024, 2000)]
    points += [(128, b) for b in (2, 4, 8, 16)]  # at most 2048 tokens: one step each
    rows = profile_engine(eng, "demo", "cpu", points, 8, 3)
    table = Path(args.table)
    write_table(table, rows)
    perf = TablePerfModel.from_csv(table, "demo", "cpu")
    trace = synthetic_trace(
        args.requests,
        args.rate,
        LengthDist("uniform", low=32, high=512),
        LengthDist("uniform", low=4, high=48),
        seed=1,
    )
    # Real time: add each request when its arrival comes, step while anything is unfinished.
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    pending = list(trace)
    t0 = time.perf_counter()
    i = 0
    while len(done) < len(trace):
        now = time.perf_counter() - t0
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            eng.add_request(r.request_id, [1 + (i * 131 + k) % 4000 for k in range(r.prompt_tokens)],
                            SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))  # fmt: skip
            i += 1
        if not eng.has_unfinished():
            time.sleep(max(0.0, pending[0].arrival_s - now))
            continue
        for o in eng.step():
            t = time.perf_counter() - t0
            first.setdefault(o.request_id, t)
            if o.finished:
                done[o.request_id] = t
    live_ttft = [first[r.request_id] - r.arrival_s for r in trace]
    live_e2e = [done[r.request_id] - r.arrival_s for r in trace]
    model = model_spec_from_hf(resolve_model_dir("demo"))
    cpu = MachineSpec(
        "cpu", 1.0, 100.0, kv_capacity_tokens=eng.core.pool.num_blocks * eng.core.block_size
    )
    design = Design("one-engine", (PoolSpec("mixed", "mixed", "cpu", 1),))
    cfg = SimConfig(scheduler=SchedulerConfig(), limits=EngineLimits())
    res = Simulator(design, model, {"cpu": cpu}, {"cpu": perf}, cfg).run(trace)
    sim = {r.request_id: r for r in res.records}
    sim_ttft = [sim[r.request_id].ttft for r in trace]
    sim_e2e = [sim[r.request_id].e2e for r in trace]
    print(f"{len(trace)} requests at {args.rate} req/s on one demo engine (CPU, 1 thread)")
    for name, live, simv in (("TTFT", live_ttft, sim_ttft), ("E2E", live_e2e, sim_e2e)):
        lq = statistics.quantiles(live, n=10)
        sq = statistics.quantiles(simv, n=10)
        print(
            f"{name}: mean live {statistics.mean(live) * 1e3:7.1f} ms, sim {statistics.mean(simv) * 1e3:7.1f} ms "
            f"(sim/live {statistics.mean(simv) / statistics.mean(live):.2f}); p50 {lq[4] * 1e3:.1f} vs "
            f"{sq[4] * 1e3:.1f} ms; p90 {lq[8] * 1e3:.1f} vs {sq[8] * 1e3:.1f} ms"
        )


def main() -> None:
    """Run one benchmark."""
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--repeats", type=int, default=2)
    s.set_defaults(func=speed)
    b = sub.add_parser("bisect")
    b.add_argument("--design", default="Baseline-A:70", help="FAMILY:N or FAMILY:P+D")
    b.add_argument("--setting", choices=["paper", "ours"], default="ours")
    b.add_argument("--model", choices=["llama2-70b", "bloom-176b"], default="llama2-70b")
    b.add_argument("--requests", type=int, default=5000)
    b.set_defaults(func=bisect)
    c = sub.add_parser("compare")
    c.add_argument("--requests", type=int, default=1000)
    c.add_argument(
        "--baseline-machines",
        type=int,
        default=12,
        help="budgets = this many A100s' cost / H100s' power",
    )
    c.add_argument("--max-designs", type=int, default=5)
    c.add_argument("--iters", type=int, default=6)
    c.add_argument("--plots", default="")
    c.set_defaults(func=compare)
    e = sub.add_parser("engine")
    e.add_argument("--requests", type=int, default=60)
    e.add_argument("--rate", type=float, default=2.0)
    e.add_argument("--table", default="/tmp/batonserve_demo_profile.csv")
    e.set_defaults(func=engine)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

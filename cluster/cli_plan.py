"""`batonserve plan`: choose pool sizes and machine types by simulating a trace (Splitwise)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from batonserve.cluster.sim.design import Design, families_for
from batonserve.cluster.sim.hardware import (
    DEFAULT_MACHINES,
    DEFAULT_MODELS,
    MachineSpec,
    ModelSpec,
    model_spec_from_hf,
)
from batonserve.cluster.sim.metrics import Reference, SLOTable
from batonserve.cluster.sim.perf_model import SPLITWISE_TABLE, TablePerfModel, read_table
from batonserve.cluster.sim.planner import PlanRow, PlanSetup, plan_cost, plan_throughput
from batonserve.cluster.sim.simulator import SimConfig
from batonserve.cluster.sim.trace import load_azure_trace
from batonserve.cluster.sim.worker import EngineLimits
from batonserve.workers.config import EngineConfig


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `plan` subcommand."""
    p = sub.add_parser("plan", help="plan pool sizes and machine types by simulating a trace")
    p.add_argument("--trace", default="code", help="Azure-format trace CSV, or 'code' (bundled)")
    p.add_argument(
        "--model", default="llama2-70b", help="model name in the table (or demo / a HF dir)"
    )
    p.add_argument("--perf-table", default=str(SPLITWISE_TABLE), help="profile table CSV")
    p.add_argument("--tp", type=int, default=8, help="tensor-parallel rows of the table to use")
    p.add_argument("--slo", default="splitwise", help="'splitwise' or overrides like ttft_p99=6")
    p.add_argument("--budget", type=float, required=True, help="cost budget in $/hour")
    p.add_argument("--power-budget", type=float, default=0.0, help="power budget in W (0: none)")
    p.add_argument(
        "--rate", type=float, default=0.0, help="plan the cheapest designs for this req/s"
    )
    p.add_argument("--families", default="", help="comma list (default: every family)")
    p.add_argument("--requests", type=int, default=1000, help="first N requests of the trace")
    p.add_argument(
        "--max-designs", type=int, default=6, help="designs per family (throughput mode)"
    )
    p.add_argument("--iters", type=int, default=7, help="bisection steps for the max rate")
    p.add_argument("--reference", default="", help="machine of the uncontended reference run")
    p.add_argument(
        "--machine",
        action="append",
        default=[],
        metavar="NAME=COST:POWER[:LINK_GBPS[:KV_TOKENS]]",
        help="define or override a machine type ($/h, W, GB/s, KV token slots)",
    )
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="", help="directory for throughput-vs-cost and CDF plots")
    p.add_argument("--output", default="", help="write the best design as a pools YAML")
    p.set_defaults(func=run)


def parse_machine(text: str, base: dict[str, MachineSpec]) -> MachineSpec:
    """NAME=COST:POWER[:LINK_GBPS[:KV_TOKENS]] into a MachineSpec."""
    name, sep, rest = text.partition("=")
    parts = rest.split(":")
    if not sep or not name or not 2 <= len(parts) <= 4:
        raise ValueError(
            f"--machine: expected NAME=COST:POWER[:LINK_GBPS[:KV_TOKENS]], got {text!r}"
        )
    try:
        nums = [float(x) for x in parts]
    except ValueError:
        raise ValueError(f"--machine: numbers expected in {text!r}") from None
    old = base.get(name, MachineSpec(name, 0.0, 0.0))
    return MachineSpec(
        name,
        cost_per_hour=nums[0],
        power_w=nums[1],
        num_gpus=old.num_gpus,
        gpu_memory_gb=old.gpu_memory_gb,
        link_gb_per_s=nums[2] if len(nums) > 2 else old.link_gb_per_s,
        kv_capacity_tokens=int(nums[3]) if len(nums) > 3 else old.kv_capacity_tokens,
    )


def _model(name: str, tp: int) -> ModelSpec:
    if name in DEFAULT_MODELS:
        return DEFAULT_MODELS[name]
    from batonserve.workers.models.paths import resolve_model_dir

    return model_spec_from_hf(resolve_model_dir(name), name=name, tensor_parallel=tp)


def build_setup(args: argparse.Namespace) -> tuple[PlanSetup, list[str]]:
    """Everything the search needs, from the command line."""
    model = _model(args.model, args.tp)
    rows = [r for r in read_table(args.perf_table) if r.model == model.name]
    rows = [r for r in rows if r.tensor_parallel == args.tp] or rows
    if not rows:
        raise ValueError(f"--model: the table {args.perf_table} has no rows for {model.name!r}")
    hardware = sorted({r.hardware for r in rows})
    machines = dict(DEFAULT_MACHINES)
    for text in args.machine:
        m = parse_machine(text, machines)
        machines[m.name] = m
    missing = [h for h in hardware if h not in machines]
    if missing:
        raise ValueError(f"--machine: give cost and power for {missing} (NAME=COST:POWER)")
    for h in hardware:
        if h not in DEFAULT_MACHINES and machines[h].kv_capacity_tokens == 0:
            # A profiled machine runs one batonserve engine: its default KV cache size.
            kv = EngineConfig().kv_cache_bytes // model.kv_bytes_per_token
            machines[h] = dataclasses.replace(machines[h], kv_capacity_tokens=kv)
    perf = {h: TablePerfModel.from_rows([r for r in rows if r.hardware == h]) for h in hardware}
    ref = args.reference or ("a100-80gb" if "a100-80gb" in perf else hardware[0])
    if ref not in perf:
        raise ValueError(f"--reference: no table rows for machine {ref!r}; have {hardware}")
    if args.requests < 1:
        raise ValueError(f"--requests: must be >= 1, got {args.requests}")
    trace = load_azure_trace(args.trace, limit=args.requests)
    limits = EngineLimits()
    setup = PlanSetup(
        model=model,
        machines=machines,
        perf=perf,
        reference=Reference(perf[ref], limits.max_num_batched_tokens),
        requests=trace,
        slo=SLOTable.parse(args.slo),
        sim=SimConfig(limits=limits),
        seed=args.seed,
    )
    families = [f.strip() for f in args.families.split(",") if f.strip()] or families_for(hardware)
    return setup, families


def format_table(rows: Sequence[PlanRow], top: int) -> str:
    """The best designs as an aligned text table."""
    head = (
        f"{'#':>2}  {'design':<26} {'$/h':>7} {'kW':>6} {'req/s':>7} {'req/s/$':>8} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'TBT p50':>8} {'TBT p99':>8} {'E2E p99':>8}"
    )
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows[:top], 1):
        s = r.summary
        lat = (
            f"{s.ttft.p50 * 1e3:8.0f}ms {s.ttft.p99 * 1e3:7.0f}ms {s.tbt.p50 * 1e3:6.0f}ms "
            f"{s.tbt.p99 * 1e3:6.0f}ms {s.e2e.p99:7.2f}s"
            if s
            else "   (no tried rate met the SLOs)"
        )
        per_dollar = r.max_rate / r.cost_per_hour if r.cost_per_hour else 0.0
        lines.append(
            f"{i:>2}  {r.design.label:<26} {r.cost_per_hour:7.1f} {r.power_w / 1e3:6.1f} "
            f"{r.max_rate:7.2f} {per_dollar:8.4f} {lat}"
        )
    return "\n".join(lines)


def design_yaml(design: Design, row: PlanRow | None = None) -> str:
    """The pools file `batonserve scale` reads (one flow-style line per pool), plus a report."""
    pools = {p.name: {"replicas": p.replicas, "machine": p.machine} for p in design.pools}
    text = yaml.safe_dump({"pools": pools}, sort_keys=False, default_flow_style=None)
    if row is not None:
        report = {
            "report": {
                "family": design.family,
                "cost_per_hour": round(row.cost_per_hour, 3),
                "power_w": round(row.power_w, 1),
                "rate_within_slo": round(row.max_rate, 4),
            }
        }
        text += yaml.safe_dump(report, sort_keys=False)
    return text


def run(args: argparse.Namespace) -> int:
    """Search, print the table, and write plots and the chosen design when asked."""
    setup, families = build_setup(args)
    t0 = time.time()

    def progress(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    print(
        f"planning {families} for {setup.model.name}: {len(setup.requests)} requests, "
        f"budget ${args.budget}/h" + (f", {args.rate} req/s" if args.rate > 0 else ""),
        file=sys.stderr,
    )
    if args.rate > 0:
        rows = plan_cost(setup, families, args.rate, args.budget, progress=progress)
    else:
        rows = plan_throughput(
            setup, families, args.budget, args.power_budget, args.max_designs, args.iters, progress
        )
    print(format_table(rows, args.top))
    if args.plot:
        from batonserve.cluster.sim.plots import plot_latency_cdf, plot_throughput_vs_cost

        out = Path(args.plot)
        out.mkdir(parents=True, exist_ok=True)
        a = plot_throughput_vs_cost(rows, out / "throughput_vs_cost.png")
        b = plot_latency_cdf(rows, out / "latency_cdf.png")
        print(f"plots: {a} {b}", file=sys.stderr)
    if args.output:
        if not rows or rows[0].max_rate <= 0:
            raise ValueError("--output: no design met the SLOs; nothing to write")
        Path(args.output).write_text(design_yaml(rows[0].design, rows[0]))
        print(f"chosen design written to {args.output}", file=sys.stderr)
    return 0

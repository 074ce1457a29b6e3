"""`batonserve plan`: choose pool sizes and machine types by simulating a trace (Splitwise)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from batonserve.cluster.sim.design import Design, families_for, perf_key
from batonserve.cluster.sim.hardware import (
    DEFAULT_MACHINES,
    DEFAULT_MODELS,
    MachineSpec,
    ModelSpec,
    model_spec_from_hf,
)
from batonserve.cluster.sim.metrics import Reference, SLOTable
from batonserve.cluster.sim.paper import plan_setup as paper_plan_setup
from batonserve.cluster.sim.perf_model import SPLITWISE_TABLE, TablePerfModel, TableRow, read_table
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
    p.add_argument(
        "--tp",
        default="8",
        help="tensor-parallel degree(s) of a worker, comma list (e.g. 4,8): each pool of each "
        "design is tried at each (throughput mode); the table needs rows for them",
    )
    p.add_argument(
        "--setting",
        choices=["batonserve", "paper"],
        default="batonserve",
        help="how the cluster serves: batonserve's engine and scheduler, or the Splitwise paper's "
        "(whole prompts, 512-request batches, no conditional disaggregation, its KV and SLO model)",
    )
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


def _tp_list(text: str) -> list[int]:
    try:
        tps = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--tp: a comma list of integers, got {text!r}") from None
    if not tps or any(t < 1 for t in tps):
        raise ValueError(f"--tp: degrees must be >= 1, got {text!r}")
    return tps


def _model(name: str, tp: int) -> ModelSpec:
    if name in DEFAULT_MODELS:
        return dataclasses.replace(DEFAULT_MODELS[name], tensor_parallel=tp)
    from batonserve.workers.models.paths import resolve_model_dir

    return model_spec_from_hf(resolve_model_dir(name), name=name, tensor_parallel=tp)


def build_setup(args: argparse.Namespace) -> tuple[PlanSetup, list[str], list[int]]:
    """Everything the search needs, from the command line; the TP degrees to try (0: default)."""
    tps = _tp_list(args.tp)
    model = _model(args.model, max(tps))
    all_rows = [r for r in read_table(args.perf_table) if r.model == model.name]
    if not all_rows:
        raise ValueError(f"--model: the table {args.perf_table} has no rows for {model.name!r}")
    have = sorted({r.tensor_parallel for r in all_rows})
    if len(tps) == 1 and len(have) == 1 and args.tp == "8":
        model = dataclasses.replace(model, tensor_parallel=have[0])
        tps = have  # a profiled table of one engine and no --tp: the table's own degree
    missing = [t for t in tps if t not in have]
    if missing:
        raise ValueError(
            f"--tp: the table has no {model.name} rows at tensor_parallel {missing}; it has {have}"
        )
    rows = [r for r in all_rows if r.tensor_parallel == model.tensor_parallel]
    hardware = sorted({r.hardware for r in rows})
    degrees = [0 if t == model.tensor_parallel else t for t in tps]
    if args.setting == "paper":
        return (*_paper_setup(args, model, tps, hardware), degrees)
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
    perf = _perf_models(all_rows, hardware, tps, model.tensor_parallel, "batch")
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
    return setup, families, degrees


def _perf_models(
    rows: Sequence[TableRow], hardware: list[str], tps: list[int], default_tp: int, axis: str
) -> dict[str, TablePerfModel]:
    """One model per (machine, TP degree), keyed as `perf_key` names them."""
    perf = {}
    for h in hardware:
        for tp in tps:
            sel = [r for r in rows if r.hardware == h and r.tensor_parallel == tp]
            if not sel:
                raise ValueError(f"--tp: the table has no rows for {h} at tensor_parallel={tp}")
            perf[perf_key(h, tp, default_tp)] = TablePerfModel.from_rows(sel, decode_axis=axis)
    return perf


def _paper_setup(
    args: argparse.Namespace, model: ModelSpec, tps: list[int], hardware: list[str]
) -> tuple[PlanSetup, list[str]]:
    """The Splitwise paper's setting (cluster/sim/paper.py) on the chosen trace and TP degrees."""
    if model.name != "llama2-70b" or args.machine:
        raise ValueError("--setting paper: only --model llama2-70b, without --machine")
    if args.requests < 1:
        raise ValueError(f"--requests: must be >= 1, got {args.requests}")
    trace = load_azure_trace(args.trace, limit=args.requests)
    base = paper_plan_setup("paper", trace, args.seed)
    rows = [r for r in read_table(args.perf_table) if r.model == model.name]
    perf = _perf_models(rows, sorted(base.machines), tps, model.tensor_parallel, "tokens")
    setup = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, tensor_parallel=model.tensor_parallel),
        perf=perf,
        reference=dataclasses.replace(base.reference, perf=perf["a100-80gb"]),
        slo=SLOTable.parse(args.slo),
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


def design_yaml(
    design: Design,
    row: PlanRow | None = None,
    default_tp: int = 8,
    machines: Mapping[str, MachineSpec] | None = None,
) -> str:
    """The pools file `batonserve scale` reads (one flow-style line per pool), plus a report.

    A pool's `replicas` counts workers, as the serving config does: a machine of 8 GPUs at
    tensor_parallel_size 4 runs two (the design counts machines; the report keeps that count).
    """
    pools = {}
    for p in design.pools:
        tp = p.tensor_parallel or default_tp
        spec = (machines or {}).get(p.machine)
        per = spec.num_gpus // tp if spec is not None and tp < spec.num_gpus else 1
        # GPUs per worker, as the serving config names it (0 in a design: the model's TP).
        pools[p.name] = {"replicas": p.replicas * per, "machine": p.machine}
        pools[p.name]["tensor_parallel_size"] = tp
    text = yaml.safe_dump({"pools": pools}, sort_keys=False, default_flow_style=None)
    if row is not None:
        report = {
            "report": {
                "family": design.family,
                "cost_per_hour": round(row.cost_per_hour, 3),
                "power_w": round(row.power_w, 1),
                "rate_within_slo": round(row.max_rate, 4),
                "machines": {p.name: p.replicas for p in design.pools},
            }
        }
        text += yaml.safe_dump(report, sort_keys=False)
    return text


def run(args: argparse.Namespace) -> int:
    """Search, print the table, and write plots and the chosen design when asked."""
    setup, families, degrees = build_setup(args)
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
            setup,
            families,
            args.budget,
            args.power_budget,
            args.max_designs,
            args.iters,
            progress,
            tensor_parallel=degrees,
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
        Path(args.output).write_text(
            design_yaml(rows[0].design, rows[0], setup.model.tensor_parallel, setup.machines)
        )
        print(f"chosen design written to {args.output}", file=sys.stderr)
    return 0

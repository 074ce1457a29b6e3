"""Splitwise's provisioning experiments at the paper's scale (code trace, Llama-2-70B, TP8).

    python tests/bench/bench_paper.py run isopower --setting paper
    python tests/bench/bench_paper.py run isocost --setting ours
    python tests/bench/bench_paper.py run isothroughput --setting paper --rate 70
    python tests/bench/bench_paper.py report            # tables (markdown) and plots
    python tests/bench/bench_paper.py designs isopower --model bloom-176b   # the notebooks' designs

Budgets are the paper's: the power of 40 DGX-H100s (= 70 DGX-A100s), their cost (= 86
DGX-A100s). Each family's best split is searched design by design (`search.best_split`), each
design's rate bisected to 2%. Results go to docs/img/simulator/paper/<experiment>_<setting>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from batonserve.cluster.sim.design import SPLITWISE_FAMILIES, Design, make_design
from batonserve.cluster.sim.paper import plan_setup
from batonserve.cluster.sim.planner import PlanRow, max_rate
from batonserve.cluster.sim.search import best_split, cheapest_at_rate, objective_of
from batonserve.cluster.sim.trace import load_azure_trace, sample_lengths

OUT = Path(__file__).resolve().parents[2] / "docs" / "img" / "simulator" / "paper"
BASELINES = ("Baseline-A", "Baseline-H")
SPLITS = tuple(f for f in SPLITWISE_FAMILIES if f not in BASELINES)


def _row(r: PlanRow) -> dict:
    d = r.design
    s = r.summary
    return {
        "label": d.label,
        "prefill": d.num_prefill,
        "decode": d.num_decode,
        "machines": d.num_machines,
        "cost": round(r.cost_per_hour, 3),
        "power": round(r.power_w, 3),
        "rate": round(r.max_rate, 3),
        "ttft_p99": round(s.ttft_slowdown.p99, 3) if s else None,
        "tbt_p90": round(s.tbt_slowdown.p90, 3) if s else None,
    }


def _design(d: Design | None, setup_machines: dict) -> dict | None:
    if d is None:
        return None
    return {
        "label": d.label,
        "prefill": d.num_prefill,
        "decode": d.num_decode,
        "machines": d.num_machines,
        "cost": round(d.cost_per_hour(setup_machines), 3),
        "power": round(d.power_w(setup_machines), 3),
    }


def run(args: argparse.Namespace) -> None:
    """One experiment under one setting; writes its JSON."""
    setup = plan_setup(args.setting, load_azure_trace(args.trace, limit=args.requests))
    h100 = setup.machines["h100-80gb"]
    t0 = time.time()

    def progress(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    families = [f for f in args.families.split(",") if f] or list(SPLITWISE_FAMILIES)
    OUT.mkdir(parents=True, exist_ok=True)
    conv = "" if args.trace == "code" else "_" + Path(args.trace).stem.lower()
    path = OUT / f"{args.experiment}_{args.setting}{conv}.json"
    # Families accumulate across runs (several processes may each take some families).
    out: dict = json.loads(path.read_text()) if path.exists() else {"families": {}}
    out.update({"experiment": args.experiment, "setting": args.setting})
    out["requests"] = args.requests

    def save() -> None:
        out["seconds"] = round(time.time() - t0, 1)
        latest = json.loads(path.read_text()) if path.exists() else {"families": {}}
        latest["families"].update(out["families"])
        out["families"] = latest["families"]
        path.write_text(json.dumps(out, indent=1) + "\n")

    if args.experiment in ("isopower", "isocost"):
        budget, power = 1e12, 0.0
        if args.experiment == "isopower":
            power = args.h100 * h100.power_w
        else:
            budget = args.h100 * h100.cost_per_hour
        out["budget"] = {"cost": budget if budget < 1e12 else None, "power": power or None}
        for fam in families:
            fb = best_split(setup, fam, budget, power, progress, args.first, args.rel_tol)
            out["families"][fam] = {
                "best": _row(fb.best),
                "tried": [_row(r) for r in fb.tried],
            }
            save()
            progress(f"== {fam}: {fb.best.design.label} {fb.best.max_rate:.2f} req/s")
    else:
        out["rate"] = args.rate
        for fam in families:
            res = {}
            for kind in ("cost", "power"):
                if kind == "power" and fam in ("Splitwise-AA", "Baseline-A", "Baseline-H"):
                    res[kind] = res["cost"]  # one machine type: fewest machines minimise both
                    continue
                d = cheapest_at_rate(
                    setup, fam, args.rate, objective_of(kind, setup.machines), progress=progress
                )
                res[kind] = _design(d, dict(setup.machines))
                progress(f"== {fam} {kind}-optimal: {res[kind]}")
            out["families"][fam] = res
            save()
    save()
    print(f"wrote {path} ({out['seconds']} s)")


# The designs SplitwiseSim's plotting notebook compares on the code trace (plots.ipynb:
# isopower_code_configs, isocost_code_configs): (family, prompt machines, token machines).
NOTEBOOK_DESIGNS = {
    "isopower": (
        ("Baseline-A", 70, 0),
        ("Baseline-H", 40, 0),
        ("Splitwise-AA", 55, 15),
        ("Splitwise-HH", 35, 5),
        ("Splitwise-HA", 35, 8),
        ("Splitwise-HHcap", 35, 7),
    ),
    "isocost": (
        ("Baseline-A", 86, 0),
        ("Baseline-H", 40, 0),
        ("Splitwise-AA", 66, 20),
        ("Splitwise-HH", 35, 5),
        ("Splitwise-HA", 35, 10),
        ("Splitwise-HHcap", 35, 7),
    ),
    # The same notebook's designs for the conversation trace (isopower_conv_configs), to be run
    # with `--trace conv`.
    "isopower-conv": (
        ("Baseline-A", 70, 0),
        ("Baseline-H", 40, 0),
        ("Splitwise-AA", 45, 25),
        ("Splitwise-HH", 25, 15),
        ("Splitwise-HA", 25, 26),
        ("Splitwise-HHcap", 25, 21),
    ),
    # The paper's iso-cost designs (Fig. 18b legend; its summary figures are the conversation
    # trace's), to be run with `--trace conv`.
    "isocost-conv": (
        ("Baseline-A", 86, 0),
        ("Baseline-H", 40, 0),
        ("Splitwise-AA", 51, 35),
        ("Splitwise-HH", 25, 15),
        ("Splitwise-HA", 30, 21),
        ("Splitwise-HHcap", 30, 10),
    ),
}


def _trace(args: argparse.Namespace) -> list:
    """The code trace (or `--trace PATH`), its first N requests or N drawn as SplitwiseSim does."""
    if args.sample:  # SplitwiseSim's traces: lengths drawn independently from the trace
        return sample_lengths(load_azure_trace(args.trace), args.requests, seed=1)
    return load_azure_trace(args.trace, limit=args.requests)


def _variant_tag(args: argparse.Namespace) -> str:
    """File-name suffix for the variants that are not the paper's default."""
    tag = ""
    if args.trace != "code":
        tag += "_" + Path(args.trace).stem.lower()
    if args.reference != "a100-80gb":
        tag += "_ref-" + args.reference
    return tag


def designs(args: argparse.Namespace) -> None:
    """Each of the notebook's designs for an experiment, rated (bisected to 2%); writes JSON."""
    setup = plan_setup(args.setting, _trace(args), model=args.model, reference=args.reference)
    t0 = time.time()
    tag = (
        f"_{args.requests}{'s' if args.sample else ''}"
        if args.requests != 3000 or args.sample
        else ""
    ) + _variant_tag(args)
    path = OUT / f"{args.experiment}_designs_{args.setting}_{args.model}{tag}.json"
    out: dict = json.loads(path.read_text()) if path.exists() else {"designs": {}}
    out.update({"experiment": args.experiment, "setting": args.setting, "model": args.model})
    out["requests"] = args.requests
    out["sampled"] = args.sample
    wanted = [f for f in args.families.split(",") if f]
    for fam, p, d in NOTEBOOK_DESIGNS[args.experiment]:
        if wanted and fam not in wanted:
            continue
        design = make_design(fam, p) if fam.startswith("Baseline") else make_design(fam, p, d)
        row = max_rate(setup, design, iters=12, rel_tol=args.rel_tol)
        out["designs"][fam] = _row(row)
        print(f"[{time.time() - t0:6.0f}s] {design.label}: {row.max_rate:.2f} req/s", flush=True)
        path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


def check(args: argparse.Namespace) -> None:
    """Whether each design (FAMILY:N or FAMILY:P+D) meets the SLOs at one rate, and its slowdowns;
    or, with --max-rate, the highest rate at which it does (bisected to 2%)."""
    from batonserve.cluster.sim.planner import evaluate

    setup = plan_setup(args.setting, _trace(args), model=args.model, reference=args.reference)
    if args.prompt_budget:  # a variant: the engine's per-step token budget on every machine
        limits = dataclasses.replace(setup.sim.limits, max_num_batched_tokens=args.prompt_budget)
        setup = dataclasses.replace(setup, sim=dataclasses.replace(setup.sim, limits=limits))
    for text in args.designs:
        fam, _, counts = text.partition(":")
        design = make_design(fam, *(int(x) for x in counts.split("+")))
        t0 = time.time()
        if args.max_rate:
            row = max_rate(setup, design, iters=12, rel_tol=0.02)
            ms = row.summary
            slow = (
                f"; TTFT p99 {ms.ttft_slowdown.p99:.2f}x, TBT p90 {ms.tbt_slowdown.p90:.2f}x"
                if ms
                else ""
            )
            print(f"{design.label}: {row.max_rate:.1f} req/s{slow} ({time.time() - t0:.0f} s)")
            continue
        s, _ = evaluate(setup, design, args.rate)
        print(
            f"{design.label} at {args.rate} req/s ({args.requests} requests"
            f"{', sampled' if args.sample else ''}): {'meets' if s.slo_met else 'misses'} the SLOs; "
            f"TTFT p99 {s.ttft_slowdown.p99:.2f}x, TBT p90 {s.tbt_slowdown.p90:.2f}x, "
            f"E2E p90 {s.e2e_slowdown.p90:.2f}x ({time.time() - t0:.0f} s)"
            f"{'' if s.slo_met else '; broken: ' + ', '.join(s.slo_violations)}",
            flush=True,
        )


def main() -> None:
    """Run an experiment or write the report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("experiment", choices=["isopower", "isocost", "isothroughput"])
    r.add_argument("--setting", choices=["paper", "ours"], default="paper")
    r.add_argument("--requests", type=int, default=3000)
    r.add_argument("--h100", type=int, default=40, help="budget = this many DGX-H100s")
    r.add_argument("--rate", type=float, default=70.0, help="isothroughput: requests/s")
    r.add_argument("--families", default="", help="comma list (default: all six)")
    r.add_argument("--first", type=int, default=5, help="splits sampled before refining")
    r.add_argument("--rel-tol", type=float, default=0.02, help="rate bisection tolerance")
    r.add_argument("--trace", default="code", help="'code', 'conv' (bundled) or an Azure trace CSV")
    r.set_defaults(func=run)
    d = sub.add_parser("designs")
    d.add_argument("experiment", choices=sorted(NOTEBOOK_DESIGNS))
    d.add_argument("--setting", choices=["paper", "ours"], default="paper")
    d.add_argument("--model", choices=["llama2-70b", "bloom-176b"], default="llama2-70b")
    d.add_argument("--requests", type=int, default=3000)
    d.add_argument("--families", default="", help="comma list (default: all six)")
    d.add_argument("--sample", action="store_true", help="lengths drawn i.i.d. (SplitwiseSim)")
    d.add_argument("--trace", default="code", help="'code', 'conv' (bundled) or an Azure trace CSV")
    d.add_argument(
        "--reference", default="a100-80gb", help="machine of the slowdown reference (variant)"
    )
    d.add_argument("--rel-tol", type=float, default=0.02, help="rate bisection tolerance")
    d.set_defaults(func=designs)
    c = sub.add_parser("check")
    c.add_argument("designs", nargs="+", help="FAMILY:N or FAMILY:P+D")
    c.add_argument("--rate", type=float, default=70.0)
    c.add_argument("--setting", choices=["paper", "ours"], default="paper")
    c.add_argument("--model", choices=["llama2-70b", "bloom-176b"], default="llama2-70b")
    c.add_argument("--requests", type=int, default=3000)
    c.add_argument("--sample", action="store_true", help="lengths drawn i.i.d. (SplitwiseSim)")
    c.add_argument("--trace", default="code", help="'code', 'conv' (bundled) or an Azure trace CSV")
    c.add_argument(
        "--reference", default="a100-80gb", help="machine of the slowdown reference (variant)"
    )
    c.add_argument("--max-rate", action="store_true", help="bisect each design's highest rate")
    c.add_argument("--prompt-budget", type=int, default=0, help="tokens per step (variant)")
    c.set_defaults(func=check)
    rep = sub.add_parser("report")
    rep.set_defaults(func=report)
    args = p.parse_args()
    args.func(args)


def report(args: argparse.Namespace) -> None:
    """Markdown tables of paper vs ours from the JSON results, and plots."""
    from paper_report import write_report

    write_report(OUT)


if __name__ == "__main__":
    main()

"""Provisioning by simulation: search pool sizes and machine types under a budget and SLOs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from batonserve.cluster.scheduling.types import PREFILL_CAPABLE
from batonserve.cluster.sim.design import (
    FAMILIES,
    Design,
    Family,
    make_design,
    perf_key,
    with_tensor_parallel,
)
from batonserve.cluster.sim.hardware import MachineSpec, ModelSpec
from batonserve.cluster.sim.metrics import Reference, SLOGuard, SLOTable, Summary, summarize
from batonserve.cluster.sim.perf_model import PerfModel
from batonserve.cluster.sim.simulator import SimConfig, SimResult, Simulator, worker_machine
from batonserve.cluster.sim.trace import TraceRequest, retime_poisson

Progress = Callable[[str], None]


@dataclass(frozen=True)
class PlanSetup:
    """What every simulation of a plan shares."""

    model: ModelSpec
    machines: Mapping[str, MachineSpec]
    perf: Mapping[str, PerfModel]
    reference: Reference
    requests: Sequence[TraceRequest]  # re-timed to each tried rate, same order and lengths
    slo: SLOTable = field(default_factory=SLOTable)
    sim: SimConfig = field(default_factory=SimConfig)
    seed: int = 0


@dataclass(frozen=True)
class PlanRow:
    """One evaluated design: its highest rate meeting the SLOs, and the run at that rate."""

    design: Design
    cost_per_hour: float
    power_w: float
    max_rate: float  # requests/s sustained within the SLOs (0: none tried passed)
    summary: Summary | None
    result: SimResult | None


def evaluate(
    setup: PlanSetup, design: Design, rate: float, stop_early: bool = False
) -> tuple[Summary, SimResult]:
    """Simulate `design` under the requests arriving at `rate` per second.

    `stop_early`: end the run as soon as an SLO is surely broken (a search needs only the
    verdict of a failing run, not its figures).
    """
    trace = retime_poisson(setup.requests, rate, setup.seed)
    guard = SLOGuard(trace, setup.reference, setup.slo) if stop_early else None
    sim = Simulator(design, setup.model, setup.machines, setup.perf, setup.sim)
    result = sim.run(trace, guard)
    return summarize(result, setup.reference, setup.machines, setup.slo), result


def capacity_bound(setup: PlanSetup, design: Design) -> float:
    """An optimistic rate ceiling: prompt throughput of the machines that prefill, all busy."""
    mean_prompt = sum(r.prompt_tokens for r in setup.requests) / max(1, len(setup.requests))
    chunk = setup.sim.limits.max_num_batched_tokens
    tokens_per_s = 0.0
    lendable = design.num_prefill and design.num_decode
    for p in design.pools:
        perf = setup.perf[perf_key(p.machine, p.tensor_parallel, setup.model.tensor_parallel)]
        _, per_machine = worker_machine(setup.machines[p.machine], p.tensor_parallel, setup.model)
        workers = p.replicas * per_machine
        if p.role in PREFILL_CAPABLE:
            tokens_per_s += workers * chunk / perf.step_time(chunk, 0)
        elif lendable:  # borrowed decode machines add prompt capacity through the mixed pool
            tokens_per_s += 0.5 * workers * chunk / perf.step_time(chunk, 0)
    return tokens_per_s / mean_prompt


def max_rate(
    setup: PlanSetup,
    design: Design,
    iters: int = 7,
    max_halvings: int = 20,
    rel_tol: float = 0.02,
    shrink: float = 0.7,
) -> PlanRow:
    """The highest arrival rate whose run meets every SLO: step down to a pass, then bisect.

    From 0.75 x the capacity bound the rate is multiplied by `shrink` until a run passes (failing
    runs stop early, so a gentler `shrink` costs little and leaves a narrower bracket). Bisection
    stops after `iters` steps, or sooner once the bracket is within `rel_tol` of its top (0.02:
    the answer is known to 2%, finer than the paper's 10 req/s grid at its rates).
    """
    if not 0.0 < shrink < 1.0:
        raise ValueError(f"shrink: must be in (0, 1), got {shrink}")
    hi = 1.5 * capacity_bound(setup, design)
    lo = 0.0
    best: tuple[Summary, SimResult] | None = None
    rate = hi / 2
    for _ in range(max_halvings):  # weak designs pass only far below their capacity bound
        summary, result = evaluate(setup, design, rate, stop_early=True)
        if summary.slo_met:
            lo, best = rate, (summary, result)
            break
        hi, rate = rate, rate * shrink
    for _ in range(iters if best else 0):
        if rel_tol > 0 and hi - lo <= rel_tol * hi:
            break
        mid = (lo + hi) / 2
        summary, result = evaluate(setup, design, mid, stop_early=True)
        if summary.slo_met:
            lo, best = mid, (summary, result)
        else:
            hi = mid
    return PlanRow(
        design,
        design.cost_per_hour(setup.machines),
        design.power_w(setup.machines),
        lo,
        best[0] if best else None,
        best[1] if best else None,
    )


def budget_designs(
    family: Family,
    machines: Mapping[str, MachineSpec],
    budget: float,
    power_budget: float = 0.0,
    max_designs: int = 6,
) -> list[Design]:
    """Designs of a family that spend the budget: each prefill count with as many decoders as fit."""

    def fits(d: Design) -> bool:
        ok = d.cost_per_hour(machines) <= budget + 1e-9
        return ok and (power_budget <= 0 or d.power_w(machines) <= power_budget + 1e-9)

    if family.colocated:
        n = 0
        while n < 4096 and fits(make_design(family.name, n + 1)):
            n += 1
        return [make_design(family.name, n)] if n else []
    out: list[Design] = []
    p = 1
    while p <= 1024 and fits(make_design(family.name, p, 1)):
        d = 1
        while d < 1024 and fits(make_design(family.name, p, d + 1)):
            d += 1
        out.append(make_design(family.name, p, d))
        p += 1
    if max_designs < 1:
        raise ValueError(f"max_designs: must be >= 1, got {max_designs}")
    if len(out) > max_designs:  # an even spread over the prefill:decode ratios
        if max_designs == 1:
            return [out[len(out) // 2]]
        step = (len(out) - 1) / (max_designs - 1)
        out = [out[round(i * step)] for i in range(max_designs)]
    return out


def plan_throughput(
    setup: PlanSetup,
    families: Sequence[str],
    budget: float,
    power_budget: float = 0.0,
    max_designs: int = 6,
    iters: int = 7,
    progress: Progress | None = None,
    tensor_parallel: Sequence[int] = (0,),
) -> list[PlanRow]:
    """For each family, the designs that spend the budget, ranked by throughput within the SLOs.

    `tensor_parallel`: the TP degrees to try for each pool (0: the model's default); every
    design is tried with every combination (a colocated one with each degree).
    """
    designs: list[Design] = []
    for name in families:
        if name not in FAMILIES:
            raise ValueError(f"families: unknown family {name!r}; choose from {sorted(FAMILIES)}")
        base = budget_designs(FAMILIES[name], setup.machines, budget, power_budget, max_designs)
        combos = [
            (p, d)
            for p in tensor_parallel
            for d in tensor_parallel
            if not FAMILIES[name].colocated or p == d
        ]
        designs += [
            with_tensor_parallel(b, p, d) if (p, d) != (0, 0) else b
            for b in base
            for p, d in combos
        ]
    if not designs:
        raise ValueError(f"budget: {budget} $/h buys no design of {list(families)}")
    rows = []
    for i, d in enumerate(designs, 1):
        row = max_rate(setup, d, iters)
        rows.append(row)
        if progress:
            progress(
                f"[{i}/{len(designs)}] {d.label}: {row.max_rate:.2f} req/s within SLO "
                f"(${row.cost_per_hour:.1f}/h, {row.power_w / 1e3:.1f} kW)"
            )
    rows.sort(key=lambda r: (-r.max_rate, r.cost_per_hour))
    return rows


def plan_cost(
    setup: PlanSetup,
    families: Sequence[str],
    rate: float,
    budget: float,
    max_prefill: int = 16,
    progress: Progress | None = None,
) -> list[PlanRow]:
    """The cheapest designs of each family that meet the SLOs at `rate` (within the budget)."""
    rows: list[PlanRow] = []
    for name in families:
        fam = FAMILIES.get(name)
        if fam is None:
            raise ValueError(f"families: unknown family {name!r}; choose from {sorted(FAMILIES)}")
        pm = setup.machines[fam.prefill_machine]
        dm = setup.machines[fam.decode_machine]
        counts = range(1, 2) if fam.colocated else range(1, max_prefill + 1)
        for p in counts:
            spent = 0.0 if fam.colocated else p * pm.cost_per_hour
            if spent > budget:
                break
            unit = dm.cost_per_hour if not fam.colocated else pm.cost_per_hour
            top = int((budget - spent) // unit) if unit > 0 else 64
            found = _fewest(setup, fam, p, top, rate)
            if found is not None:
                rows.append(found)
                if progress:
                    progress(
                        f"{found.design.label}: meets SLO at {rate} req/s, ${found.cost_per_hour:.1f}/h"
                    )
            elif progress:
                progress(
                    f"{name} with {p} prefill: no size within budget meets the SLO at {rate} req/s"
                )
    rows.sort(key=lambda r: (r.cost_per_hour, r.power_w))
    return rows


def _fewest(setup: PlanSetup, fam: Family, p: int, top: int, rate: float) -> PlanRow | None:
    """Bisect the second pool's size (or the colocated count) for the fewest that meet the SLOs."""

    def design(n: int) -> Design:
        return make_design(fam.name, n) if fam.colocated else make_design(fam.name, p, n)

    if top < 1:
        return None
    s, r = evaluate(setup, design(top), rate, stop_early=True)
    if not s.slo_met:
        return None
    lo, hi, best = 0, top, (s, r)  # hi meets the SLOs, lo does not (0 never does)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        s, r = evaluate(setup, design(mid), rate, stop_early=True)
        if s.slo_met:
            hi, best = mid, (s, r)
        else:
            lo = mid
    d = design(hi)
    return PlanRow(d, d.cost_per_hour(setup.machines), d.power_w(setup.machines), rate, *best)


def isoline_ratio(rows: Sequence[PlanRow], family: str, baseline: str) -> float:
    """Best throughput of `family` over best of `baseline` among the rows (NaN if either is 0)."""
    a = max((r.max_rate for r in rows if r.design.family == family), default=0.0)
    b = max((r.max_rate for r in rows if r.design.family == baseline), default=0.0)
    return a / b if a > 0 and b > 0 else math.nan

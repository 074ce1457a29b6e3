"""Fine design searches: the best prompt:token split of a family, the cheapest design at a rate.

A family's throughput under a budget rises and then falls with the number of prompt machines
(too few: prompts queue; too many: tokens do), so instead of a fixed grid of splits the search
samples a few, then halves the step around the best until neighbouring splits are compared:
the answer is the best split, not the best of a grid. Designs are evaluated once each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from batonserve.cluster.sim.design import FAMILIES, Design, make_design
from batonserve.cluster.sim.hardware import MachineSpec
from batonserve.cluster.sim.planner import PlanRow, PlanSetup, budget_designs, evaluate, max_rate

Progress = Callable[[str], None]


def refine_max(n: int, score: Callable[[int], float], first: int = 5) -> int:
    """Index in [0, n) with the highest score: `first` spread samples, then halving steps."""
    if n < 1:
        raise ValueError("refine_max: nothing to search")
    seen: dict[int, float] = {}

    def at(i: int) -> float:
        if i not in seen:
            seen[i] = score(i)
        return seen[i]

    # Samples at the middles of k equal slices: the extreme splits (one prompt machine, one
    # token machine) are tried only if the search walks there, and they are the slowest to rate.
    k = min(n, max(2, first))
    for j in range(k):
        at(min(n - 1, int((j + 0.5) * n / k)))
    step = max(1, math.ceil(n / k))
    while True:
        best = max(seen, key=lambda i: (seen[i], -i))
        step = max(1, step // 2) if step > 1 else 1
        for i in (best - step, best + step):
            if 0 <= i < n:
                at(i)
        settled = all(i in seen for i in (best - 1, best + 1) if 0 <= i < n)
        if step == 1 and settled and max(seen, key=lambda i: (seen[i], -i)) == best:
            return best


@dataclass(frozen=True)
class FamilyBest:
    """A family's best design under a budget, and every design the search evaluated."""

    family: str
    best: PlanRow
    tried: tuple[PlanRow, ...]


def best_split(
    setup: PlanSetup,
    family: str,
    budget: float,
    power_budget: float = 0.0,
    progress: Progress | None = None,
    first: int = 5,
    rel_tol: float = 0.02,
) -> FamilyBest:
    """The family's highest-throughput design that spends the budget, over every split."""
    designs = budget_designs(FAMILIES[family], setup.machines, budget, power_budget, 10_000)
    if not designs:
        raise ValueError(f"{family}: the budget buys no design")
    rows: dict[int, PlanRow] = {}

    def score(i: int) -> float:
        rows[i] = max_rate(setup, designs[i], iters=12, rel_tol=rel_tol)
        if progress:
            progress(f"{designs[i].label}: {rows[i].max_rate:.2f} req/s")
        return rows[i].max_rate

    best = refine_max(len(designs), score, first)
    return FamilyBest(family, rows[best], tuple(rows[i] for i in sorted(rows)))


def _meets(setup: PlanSetup, design: Design, rate: float) -> bool:
    return evaluate(setup, design, rate, stop_early=True)[0].slo_met


def cheapest_at_rate(
    setup: PlanSetup,
    family: str,
    rate: float,
    objective: Callable[[Design], float],
    max_machines: int = 400,
    progress: Progress | None = None,
) -> Design | None:
    """The family's design minimising `objective` (cost or power) that meets the SLOs at `rate`.

    For each prompt count, the fewest token machines that pass (doubling, then bisection);
    prompt counts from half to three times what the prompt load alone needs are searched like
    splits, on the objective of their cheapest passing design.
    """
    fam = FAMILIES[family]

    def fewest(make: Callable[[int], Design], top: int) -> Design | None:
        hi = 1
        while not _meets(setup, make(hi), rate):
            if hi >= top:
                return None
            hi = min(top, 2 * hi)
        lo = hi // 2 if hi > 1 else 0  # lo fails (or is 0), hi passes
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _meets(setup, make(mid), rate):
                hi = mid
            else:
                lo = mid
        return make(hi)

    if fam.colocated:
        return fewest(lambda n: make_design(family, n), max_machines)
    mean_prompt = sum(r.prompt_tokens for r in setup.requests) / max(1, len(setup.requests))
    chunk = setup.sim.limits.max_num_batched_tokens
    per_machine = chunk / setup.perf[fam.prefill_machine].step_time(chunk, 0)
    need = rate * mean_prompt / per_machine
    first_p = max(1, math.floor(0.5 * need))
    last_p = max(first_p, math.ceil(3 * need))
    found: dict[int, Design | None] = {}

    def score(i: int) -> float:
        p = first_p + i
        d = fewest(lambda t: make_design(family, p, t), max_machines - p)
        found[i] = d
        if progress:
            progress(f"{family} {p}P: " + (d.label if d else "none passes"))
        return -objective(d) if d else -math.inf

    best = refine_max(last_p - first_p + 1, score, first=6)
    return found[best]


def objective_of(kind: str, machines: Mapping[str, MachineSpec]) -> Callable[[Design], float]:
    """'cost' or 'power' of a design."""
    if kind == "cost":
        return lambda d: d.cost_per_hour(machines)
    if kind == "power":
        return lambda d: d.power_w(machines)
    raise ValueError(f"objective: 'cost' or 'power', got {kind!r}")

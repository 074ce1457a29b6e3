"""Latency percentiles, SLO attainment against Splitwise's slowdown table, throughput, goodput."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from batonserve.cluster.sim.hardware import MachineSpec
from batonserve.cluster.sim.perf_model import PerfModel
from batonserve.cluster.sim.simulator import RequestRecord, SimResult
from batonserve.cluster.sim.trace import TraceRequest

QUANTILES = (50, 90, 99)
METRICS = ("ttft", "tbt", "e2e")


@dataclass(frozen=True)
class SLOTable:
    """Slowdown limits at P50, P90, P99, relative to the same request run alone (uncontended).

    Defaults: the Splitwise paper's SLO table (TTFT 2x/3x/6x; TBT and E2E 1.25x/1.5x/5x).
    """

    ttft: tuple[float, float, float] = (2.0, 3.0, 6.0)
    tbt: tuple[float, float, float] = (1.25, 1.5, 5.0)
    e2e: tuple[float, float, float] = (1.25, 1.5, 5.0)

    @classmethod
    def parse(cls, text: str) -> SLOTable:
        """'splitwise', or overrides like 'ttft_p99=10,tbt_p50=1.5' on top of Splitwise's table."""
        limits = {m: list(getattr(cls(), m)) for m in METRICS}
        text = text.strip()
        if text and text != "splitwise":
            for item in text.split(","):
                key, sep, value = item.partition("=")
                metric, _, q = key.strip().partition("_p")
                if not sep or metric not in limits or q not in {"50", "90", "99"}:
                    raise ValueError(
                        f"slo: cannot read {item!r}; use e.g. ttft_p99=6,tbt_p50=1.25 "
                        "(metrics ttft, tbt, e2e; quantiles p50, p90, p99)"
                    )
                try:
                    limit = float(value)
                except ValueError:
                    raise ValueError(f"slo: {key.strip()} needs a number, got {value!r}") from None
                if limit <= 0:
                    raise ValueError(f"slo: {key.strip()} must be > 0, got {limit}")
                limits[metric][QUANTILES.index(int(q))] = limit
        return cls(*(tuple(limits[m]) for m in METRICS))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Percentiles:
    """P50, P90 and P99 of one quantity."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        """Linear-interpolated percentiles (NaN when there are no values)."""
        if not values:
            return cls(float("nan"), float("nan"), float("nan"))
        p = np.percentile(np.asarray(values, dtype=float), QUANTILES)
        return cls(float(p[0]), float(p[1]), float(p[2]))

    def at(self, q: int) -> float:
        """The value at quantile 50, 90 or 99."""
        return {50: self.p50, 90: self.p90, 99: self.p99}[q]


@dataclass(frozen=True)
class Reference:
    """Uncontended latencies: each request alone on a reference machine.

    Ours: the prompt in chunks of the token budget (as the engine runs it alone), TBT one decode
    step at batch 1. The paper's (`paper=True`, SplitwiseSim's notebooks): the prompt in one
    step, and TBT the token-time curve read at the prompt's length.
    """

    perf: PerfModel
    chunk_tokens: int = 2048  # <= 0: the whole prompt in one step
    paper: bool = False

    def ttft(self, prompt_tokens: int) -> float:
        """Prompt computed alone."""
        if self.paper or self.chunk_tokens <= 0:
            return self.perf.step_time(prompt_tokens, 0)
        full, rest = divmod(prompt_tokens, self.chunk_tokens)
        t = full * self.perf.step_time(self.chunk_tokens, 0)
        return t + (self.perf.step_time(rest, 0) if rest else 0.0)

    def tbt(self, prompt_tokens: int = 1) -> float:
        """Time between tokens alone (batch 1; the paper reads its curve at the prompt length)."""
        return self.perf.step_time(0, prompt_tokens if self.paper else 1)

    def counts_tbt(self, tokens_out: int) -> bool:
        """Whether a request of `tokens_out` tokens has a TBT (the paper counts every request)."""
        return self.paper or tokens_out > 1

    def measured_tbt(self, rec: RequestRecord) -> float:
        """A request's TBT: ours the mean gap between its tokens; the paper's (SplitwiseSim's
        `tbt_times`) divides the time after the first token by *all* its tokens."""
        if self.paper:
            return (rec.finish_s - rec.first_token_s) / max(1, rec.tokens_out)
        return rec.tbt


class SLOGuard:
    """Stops a run once an SLO is surely broken, whatever the requests still running will do.

    With n requests, `np.percentile`'s q-quantile lies at or above the value of rank
    floor((n - 1) q) (0-based, ascending), so once n - floor((n - 1) q) requests exceed a limit
    the quantile does too. Overloaded runs (most of a bisection's) end early that way.
    """

    def __init__(self, trace: Sequence[TraceRequest], reference: Reference, slo: SLOTable) -> None:
        self.reference = reference
        self.slo = slo
        n_all = len(trace)
        n_tbt = sum(1 for r in trace if reference.counts_tbt(r.output_tokens))
        self._need = {
            (m, i): max(1, n - math.floor((n - 1) * q / 100))
            for m, n in (("ttft", n_all), ("tbt", n_tbt), ("e2e", n_all))
            for i, q in enumerate(QUANTILES)
        }
        self._over = dict.fromkeys(self._need, 0)
        self._reason = ""

    @property
    def reason(self) -> str:
        """The SLO found broken ("" while none is)."""
        return self._reason

    def _count(self, metric: str, slowdown: float) -> bool:
        limits = getattr(self.slo, metric)
        for i, q in enumerate(QUANTILES):
            if slowdown > limits[i]:
                key = (metric, i)
                self._over[key] += 1
                if self._over[key] >= self._need[key]:
                    self._reason = f"{metric}_p{q}>{limits[i]} ({self._over[key]} requests over)"
                    return True
        return False

    def first_token(self, rec: RequestRecord) -> bool:
        """Count the request's TTFT slowdown."""
        return self._count("ttft", rec.ttft / self.reference.ttft(rec.prompt_tokens))

    def finished(self, rec: RequestRecord) -> bool:
        """Count its TBT and end-to-end slowdowns."""
        tbt_ref = self.reference.tbt(rec.prompt_tokens)
        ref_e2e = self.reference.ttft(rec.prompt_tokens) + tbt_ref * (rec.tokens_out - 1)
        tbt = self.reference.measured_tbt(rec)
        if self.reference.counts_tbt(rec.tokens_out) and self._count("tbt", tbt / tbt_ref):
            return True
        return self._count("e2e", rec.e2e / ref_e2e)


@dataclass(frozen=True)
class Summary:
    """A run's figures: latencies in seconds, slowdowns as ratios, rates per second."""

    label: str
    num_requests: int
    num_completed: int
    num_rejected: int
    ttft: Percentiles
    tbt: Percentiles
    e2e: Percentiles
    ttft_slowdown: Percentiles
    tbt_slowdown: Percentiles
    e2e_slowdown: Percentiles
    slo_met: bool
    slo_violations: tuple[str, ...]
    throughput_rps: float
    goodput_rps: float
    output_tokens_per_s: float
    cost_per_hour: float
    power_w: float
    num_in_place: int
    num_disaggregated: int
    num_borrows: int
    num_returns: int
    mean_visible_transfer_s: float  # decode-side wait after the prompt's last layer


def summarize(
    result: SimResult,
    reference: Reference,
    machines: Mapping[str, MachineSpec],
    slo: SLOTable | None = None,
) -> Summary:
    """Percentiles, SLO attainment and rates of one run."""
    slo = slo or SLOTable()
    done = [r for r in result.records if r.finish_s >= 0]
    rejected = sum(1 for r in result.records if r.rejected)
    ttft_sd, tbt_sd, e2e_sd, good = [], [], [], 0
    for r in done:
        ref_ttft = reference.ttft(r.prompt_tokens)
        tbt_ref = reference.tbt(r.prompt_tokens)
        ref_e2e = ref_ttft + tbt_ref * (r.tokens_out - 1)
        s_ttft = r.ttft / ref_ttft
        s_e2e = r.e2e / ref_e2e
        ttft_sd.append(s_ttft)
        e2e_sd.append(s_e2e)
        ok = s_ttft <= slo.ttft[1] and s_e2e <= slo.e2e[1]
        if reference.counts_tbt(r.tokens_out):
            tbt = reference.measured_tbt(r) / tbt_ref
            tbt_sd.append(tbt)
            ok = ok and tbt <= slo.tbt[1]
        good += ok
    sd = {
        "ttft": Percentiles.of(ttft_sd),
        "tbt": Percentiles.of(tbt_sd),
        "e2e": Percentiles.of(e2e_sd),
    }
    violations = [
        f"{m}_p{q}={sd[m].at(q):.2f}>{getattr(slo, m)[i]}"
        for m in METRICS
        for i, q in enumerate(QUANTILES)
        if sd[m].at(q) > getattr(slo, m)[i]
    ]
    if rejected:
        violations.append(f"rejected={rejected}")
    if result.stopped:
        violations.append(f"stopped early: {result.stopped}")
    start = min((r.arrival_s for r in result.records), default=0.0)
    span = max((r.finish_s for r in done), default=start) - start
    visible = [r.transfer_end_s - r.prefill_end_s for r in done if r.transfer_end_s >= 0]
    return Summary(
        label=result.design.label,
        num_requests=len(result.records),
        num_completed=len(done),
        num_rejected=rejected,
        ttft=Percentiles.of([r.ttft for r in done]),
        tbt=Percentiles.of(
            [reference.measured_tbt(r) for r in done if reference.counts_tbt(r.tokens_out)]
        ),
        e2e=Percentiles.of([r.e2e for r in done]),
        ttft_slowdown=sd["ttft"],
        tbt_slowdown=sd["tbt"],
        e2e_slowdown=sd["e2e"],
        slo_met=not violations,
        slo_violations=tuple(violations),
        throughput_rps=len(done) / span if span > 0 else 0.0,
        goodput_rps=good / span if span > 0 else 0.0,
        output_tokens_per_s=sum(r.tokens_out for r in done) / span if span > 0 else 0.0,
        cost_per_hour=result.design.cost_per_hour(machines),
        power_w=result.design.power_w(machines),
        num_in_place=sum(1 for r in result.records if r.mode == "in_place"),
        num_disaggregated=sum(1 for r in result.records if r.mode == "disaggregated"),
        num_borrows=sum(1 for c in result.role_changes if c.kind == "borrow"),
        num_returns=sum(1 for c in result.role_changes if c.kind == "return"),
        mean_visible_transfer_s=float(np.mean(visible)) if visible else 0.0,
    )


def latencies(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """Per-request values of 'ttft', 'tbt' or 'e2e' (completed requests only)."""
    done = [r for r in records if r.finish_s >= 0]
    if metric == "tbt":
        return [r.tbt for r in done if r.tokens_out > 1]
    return [getattr(r, metric) for r in done]

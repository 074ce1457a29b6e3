"""Latency percentiles, throughput, goodput against SLOs and errors by code, from bench results."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from batonserve.cluster.bench.drivers import RequestResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class SLO:
    """Latency targets in seconds; 0 means no target. TBT is checked per request on its mean gap."""

    ttft_s: float = 0.0
    tbt_s: float = 0.0
    e2e_s: float = 0.0

    def met(self, r: RequestResult) -> bool:
        """True when `r` succeeded and meets every set target."""
        if not r.ok:
            return False
        ttft = r.ttft_s
        if self.ttft_s and (ttft is None or ttft > self.ttft_s):
            return False
        if self.tbt_s and r.tbt_s and sum(r.tbt_s) / len(r.tbt_s) > self.tbt_s:
            return False
        return not (self.e2e_s and r.e2e_s > self.e2e_s)


@dataclass(frozen=True)
class Percentiles:
    """P50/P90/P99 and mean of one latency, in seconds (NaN when there are no samples)."""

    p50: float
    p90: float
    p99: float
    mean: float
    count: int


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation between closest ranks); NaN when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentiles(values: Sequence[float]) -> Percentiles:
    """P50/P90/P99 and the mean of `values`."""
    mean = sum(values) / len(values) if values else math.nan
    p50, p90, p99 = (percentile(values, q) for q in PERCENTILES)
    return Percentiles(p50, p90, p99, mean, len(values))


@dataclass(frozen=True)
class BenchReport:
    """What one bench run measured."""

    label: str  # e.g. "rate=4/s" or "concurrency=8"
    offered_rate: float | None  # requests/s asked for (None in closed loop)
    wall_s: float
    requests: int
    completed: int
    ttft: Percentiles  # successful requests
    tbt: Percentiles  # every gap between tokens of successful requests, pooled
    e2e: Percentiles
    request_rate: float  # completed requests/s
    output_token_rate: float  # generated tokens/s
    total_token_rate: float  # prompt + generated tokens/s of completed requests
    goodput_rate: float  # requests/s that met every SLO
    goodput_fraction: float  # of all requests sent
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> count
    slo: SLO = field(default_factory=SLO)

    def to_json(self, results: Sequence[RequestResult] = ()) -> dict[str, Any]:
        """A JSON-ready dict; with `results`, per-request timings too."""
        out = _no_nan(asdict(self))
        if results:
            out["per_request"] = [
                {
                    "index": r.index,
                    "code": r.code,
                    "prompt_tokens": r.prompt_tokens,
                    "output_tokens": r.output_tokens,
                    "start_s": r.start_s,
                    "ttft_s": r.ttft_s,
                    "e2e_s": r.e2e_s,
                    "tbt_s": r.tbt_s,
                }
                for r in results
            ]
        return out


def _no_nan(x: Any) -> Any:
    """NaN (no samples) becomes null: strict JSON has no NaN."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    return x


def summarize(
    results: Sequence[RequestResult],
    wall_s: float,
    slo: SLO,
    label: str = "",
    offered_rate: float | None = None,
) -> BenchReport:
    """The report of one run."""
    ok = [r for r in results if r.ok]
    wall = max(wall_s, 1e-9)
    good = sum(slo.met(r) for r in results)
    return BenchReport(
        label=label,
        offered_rate=offered_rate,
        wall_s=wall_s,
        requests=len(results),
        completed=len(ok),
        ttft=percentiles([t for r in ok if (t := r.ttft_s) is not None]),
        tbt=percentiles([g for r in ok for g in r.tbt_s]),
        e2e=percentiles([r.e2e_s for r in ok]),
        request_rate=len(ok) / wall,
        output_token_rate=sum(r.output_tokens for r in ok) / wall,
        total_token_rate=sum(r.output_tokens + r.prompt_tokens for r in ok) / wall,
        goodput_rate=good / wall,
        goodput_fraction=good / len(results) if results else 0.0,
        errors=dict(Counter(r.code for r in results if not r.ok)),
        slo=slo,
    )


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.1f}"


def format_report(rep: BenchReport) -> str:
    """A human-readable table of one report."""
    lines = [
        f"== {rep.label or 'bench'}: {rep.completed}/{rep.requests} completed in {rep.wall_s:.2f}s",
        f"{'latency (ms)':<14}{'P50':>10}{'P90':>10}{'P99':>10}{'mean':>10}",
    ]
    for name, p in (("TTFT", rep.ttft), ("TBT", rep.tbt), ("end-to-end", rep.e2e)):
        lines.append(f"{name:<14}{_ms(p.p50):>10}{_ms(p.p90):>10}{_ms(p.p99):>10}{_ms(p.mean):>10}")
    lines.append(
        f"throughput: {rep.request_rate:.2f} req/s, {rep.output_token_rate:.1f} output tok/s, "
        f"{rep.total_token_rate:.1f} total tok/s"
    )
    targets = [
        f"{name}<={v * 1000:g}ms"
        for name, v in (("TTFT", rep.slo.ttft_s), ("TBT", rep.slo.tbt_s), ("E2E", rep.slo.e2e_s))
        if v
    ]
    if targets:
        lines.append(
            f"goodput: {rep.goodput_rate:.2f} req/s ({rep.goodput_fraction:.1%} of requests met "
            f"{' '.join(targets)})"
        )
    errors = ", ".join(f"{k}={v}" for k, v in sorted(rep.errors.items())) or "none"
    lines.append(f"errors: {errors}")
    return "\n".join(lines)

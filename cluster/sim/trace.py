"""Request traces: the Azure LLM inference trace (own timestamps or re-timed), or synthetic ones."""

from __future__ import annotations

import csv
import datetime as dt
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from batonserve.cluster.sim.perf_model import DATA_DIR

CODE_TRACE = DATA_DIR / "azure_llm_inference_trace_code_2023.csv"
CONV_TRACE = DATA_DIR / "azure_llm_inference_trace_conv_2023.csv"
BUNDLED_TRACES = {"code": CODE_TRACE, "conv": CONV_TRACE}


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives and how many tokens go in and come out."""

    request_id: str
    arrival_s: float  # seconds from the trace start
    prompt_tokens: int
    output_tokens: int
    # Prefix-sharing experiments: requests with the same group id >= 0 start with the same
    # `shared_prefix_tokens` tokens (the rest of every prompt is its own); -1: nothing shared.
    shared_prefix_group: int = -1
    shared_prefix_tokens: int = 0


def _parse_time(text: str) -> dt.datetime:
    # The Azure trace has 7 fractional digits; datetime takes at most 6.
    head, _, frac = text.strip().partition(".")
    base = dt.datetime.strptime(head, "%Y-%m-%d %H:%M:%S")
    return base + dt.timedelta(microseconds=int((frac + "000000")[:6])) if frac else base


def load_azure_trace(path: str | Path = CODE_TRACE, limit: int = 0) -> list[TraceRequest]:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    path = BUNDLED_TRACES.get(str(path)) or Path(path)
    out: list[TraceRequest] = []
    if not path.is_file():
        raise ValueError(
            f"trace: no such file {str(path)!r} (or give one of {sorted(BUNDLED_TRACES)})"
        )
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not need <= set(reader.fieldnames or []):
            raise ValueError(f"trace: {path} needs columns {sorted(need)}, has {reader.fieldnames}")
        t0: dt.datetime | None = None
        for i, row in enumerate(reader):
            t = _parse_time(row["TIMESTAMP"])
            t0 = t0 or t
            out.append(
                TraceRequest(
                    request_id=f"req-{i}",
                    arrival_s=(t - t0).total_seconds(),
                    prompt_tokens=max(1, int(row["ContextTokens"])),
                    output_tokens=max(1, int(row["GeneratedTokens"])),
                )
            )
            if limit and len(out) >= limit:
                break
    out.sort(key=lambda r: r.arrival_s)
    return out


def retime_poisson(trace: Sequence[TraceRequest], rate: float, seed: int = 0) -> list[TraceRequest]:
    """The same requests in the same order, arriving as a Poisson process of `rate` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for r in trace:
        t += rng.expovariate(rate)
        out.append(replace(r, arrival_s=t))
    return out


def sample_lengths(trace: Sequence[TraceRequest], n: int, seed: int = 0) -> list[TraceRequest]:
    """`n` requests whose prompt and output lengths are drawn independently, with replacement,
    from the trace's (as SplitwiseSim's generate_trace.py builds its traces); arrival times are
    left for `retime_poisson`."""
    if n < 0 or not trace:
        raise ValueError("sample_lengths: need n >= 0 and a non-empty trace")
    rng = random.Random(seed)
    return [
        TraceRequest(f"s{i}", 0.0, rng.choice(trace).prompt_tokens, rng.choice(trace).output_tokens)
        for i in range(n)
    ]


Dist = Literal["constant", "uniform", "exponential", "lognormal"]


@dataclass(frozen=True)
class LengthDist:
    """A token-count distribution: constant(mean), uniform(low, high), exponential(mean), lognormal."""

    kind: Dist
    mean: float = 0.0
    low: int = 1
    high: int = 1
    sigma: float = 1.0  # lognormal: sigma of the underlying normal; `mean` is the median

    def sample(self, rng: random.Random) -> int:
        """One draw, at least 1."""
        if self.kind == "constant":
            v = self.mean
        elif self.kind == "uniform":
            v = rng.randint(self.low, self.high)
        elif self.kind == "exponential":
            v = rng.expovariate(1.0 / self.mean)
        elif self.kind == "lognormal":
            v = rng.lognormvariate(0.0, self.sigma) * self.mean
        else:
            raise ValueError(f"unknown distribution {self.kind!r}")
        return max(1, round(v))


def synthetic_trace(
    n: int,
    rate: float,
    prompt: LengthDist,
    output: LengthDist,
    arrivals: Literal["poisson", "uniform"] = "poisson",
    seed: int = 0,
) -> list[TraceRequest]:
    """`n` requests at `rate` per second (Poisson or evenly spaced) with sampled lengths."""
    if rate <= 0 or n < 0:
        raise ValueError("synthetic trace: need rate > 0 and n >= 0")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate) if arrivals == "poisson" else 1.0 / rate
        out.append(TraceRequest(f"req-{i}", t, prompt.sample(rng), output.sample(rng)))
    return out

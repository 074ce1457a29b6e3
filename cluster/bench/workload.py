"""What the load generator sends: arrival times, prompt and output lengths, synthetic prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from batonserve.cluster.sim.trace import load_azure_trace

# Short common words: with a real BPE tokenizer " word" is one token, so N words is about N
# tokens. Used for KServe, whose requests carry text (the client has no tokenizer).
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "are",
    "be",
    "it",
    "or",
    "an",
    "was",
    "not",
    "which",
    "have",
    "but",
    "all",
    "can",
    "more",
    "one",
    "new",
    "data",
    "time",
    "code",
    "will",
    "use",
    "file",
    "line",
    "return",
    "value",
    "type",
    "list",
]


@dataclass(frozen=True)
class LengthSpec:
    """A token count: fixed (lo == hi) or uniform over [lo, hi]."""

    lo: int
    hi: int

    @staticmethod
    def parse(text: str, flag: str) -> LengthSpec:
        """'128' (fixed) or '64:256' (uniform); ValueError naming `flag` otherwise."""
        parts = text.split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            raise ValueError(f"{flag}: expected N or LO:HI token counts, got {text!r}") from None
        if len(parts) > 2 or lo < 1 or hi < lo:
            raise ValueError(f"{flag}: expected N or LO:HI with 1 <= LO <= HI, got {text!r}")
        return LengthSpec(lo, hi)

    def sample(self, rng: random.Random) -> int:
        """One token count."""
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: when (seconds from the start; None in closed loop) and how long."""

    index: int
    arrival_s: float | None
    prompt_tokens: int
    output_tokens: int


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """`n` arrival times of a Poisson process of `rate` requests per second."""
    if rate <= 0:
        raise ValueError(f"--rate: must be > 0 requests/s, got {rate}")
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def synthetic_requests(
    n: int, prompt: LengthSpec, output: LengthSpec, rate: float | None, seed: int
) -> list[BenchRequest]:
    """`n` requests with lengths from the distributions; Poisson arrivals when `rate` is given."""
    rng = random.Random(seed)
    arrivals: list[float | None] = (
        list(poisson_arrivals(n, rate, random.Random(seed + 1))) if rate else [None] * n
    )
    return [BenchRequest(i, arrivals[i], prompt.sample(rng), output.sample(rng)) for i in range(n)]


def trace_requests(
    path: str | Path,
    n: int,
    time_scale: float,
    length_scale: float,
    rate: float | None,
    seed: int,
) -> list[BenchRequest]:
    """The first `n` requests of an Azure-format trace (TIMESTAMP, ContextTokens, GeneratedTokens).

    Arrivals keep the trace's timing multiplied by `time_scale` (0.5 replays twice as fast), or
    are re-drawn as Poisson at `rate`; token counts are multiplied by `length_scale` (small
    models have short contexts), at least 1.
    """
    if time_scale <= 0:
        raise ValueError(f"--time-scale: must be > 0, got {time_scale}")
    if length_scale <= 0:
        raise ValueError(f"--length-scale: must be > 0, got {length_scale}")
    rows = load_azure_trace(path, limit=n)
    if not rows:
        raise ValueError(f"--trace: {path} has no requests")
    arrivals = (
        poisson_arrivals(len(rows), rate, random.Random(seed))
        if rate
        else [(r.arrival_s - rows[0].arrival_s) * time_scale for r in rows]
    )
    return [
        BenchRequest(
            i,
            arrivals[i],
            max(1, round(r.prompt_tokens * length_scale)),
            max(1, round(r.output_tokens * length_scale)),
        )
        for i, r in enumerate(rows)
    ]


def fit_to_context(prompt: int, output: int, context: int) -> tuple[int, int]:
    """Shrink the prompt (then the output) so that prompt + output fits a `context`-token model."""
    if context < 2:
        raise ValueError(f"context length must be >= 2 to generate, got {context}")
    output = min(output, context - 1)
    prompt = min(prompt, context - output)
    return prompt, output


def synthetic_token_ids(n: int, vocab_size: int, rng: random.Random) -> list[int]:
    """`n` random token ids, avoiding the low ids where tokenizers keep special tokens."""
    lo = min(8, vocab_size - 1)
    return [rng.randrange(lo, vocab_size) for _ in range(n)]


def synthetic_text(n: int, rng: random.Random) -> str:
    """About `n` tokens of text: `n` short common words."""
    return " ".join(rng.choice(_WORDS) for _ in range(n))

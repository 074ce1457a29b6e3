"""Step-time models: how long one engine step takes on one machine type.

The table format is Splitwise's profile table (`data/splitwise_perf_model.csv`): columns model,
hardware, prompt_size, batch_size, token_size, peak_power, average_power, prompt_time,
token_time, e2e_time (milliseconds), tensor_parallel. `batonserve profile` writes the same format
from batonserve's own engine.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

TABLE_COLUMNS = (
    "model",
    "hardware",
    "prompt_size",
    "batch_size",
    "token_size",
    "peak_power",
    "average_power",
    "prompt_time",
    "token_time",
    "e2e_time",
    "tensor_parallel",
)

DATA_DIR = Path(__file__).parent / "data"
SPLITWISE_TABLE = DATA_DIR / "splitwise_perf_model.csv"


class PerfModel(Protocol):
    """Seconds for one engine step on one machine."""

    def step_time(self, prefill_tokens: int, num_decodes: int) -> float:
        """A step computing `prefill_tokens` prompt tokens and one token for `num_decodes` requests."""
        ...


class PiecewiseLinear:
    """y(x) through sorted points: flat below the first, the last slope beyond the last."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float]) -> None:
        if len(xs) != len(ys) or not xs:
            raise ValueError("need as many y as x values, at least one")
        if any(b <= a for a, b in itertools.pairwise(xs)):
            raise ValueError("x values must be strictly increasing")
        self.xs = list(xs)
        self.ys = list(ys)

    def __call__(self, x: float) -> float:
        """Interpolated value at x."""
        xs, ys = self.xs, self.ys
        if x <= xs[0] or len(xs) == 1:
            return ys[0] if x <= xs[0] else ys[-1]
        i = bisect.bisect_left(xs, x)
        if i == len(xs):  # beyond the table: extend the last segment, never downwards
            i -= 1
            slope = max(0.0, (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]))
            return ys[i] + slope * (x - xs[i])
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class TableRow:
    """One profiled run (times in milliseconds, as in the CSV)."""

    model: str
    hardware: str
    prompt_size: int
    batch_size: int
    token_size: int
    prompt_time_ms: float
    token_time_ms: float
    tensor_parallel: int


def read_table(path: str | Path) -> list[TableRow]:
    """Rows of a performance table; raises ValueError naming a missing column."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TABLE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: performance table lacks column(s) {missing}")
        return [
            TableRow(
                model=r["model"],
                hardware=r["hardware"],
                prompt_size=int(r["prompt_size"]),
                batch_size=int(r["batch_size"]),
                token_size=int(r["token_size"]),
                prompt_time_ms=float(r["prompt_time"]),
                token_time_ms=float(r["token_time"]),
                tensor_parallel=int(r["tensor_parallel"]),
            )
            for r in reader
        ]


class TablePerfModel:
    """Interpolates a profile table piecewise-linearly over batch tokens.

    Prefill: median prompt time against prompt_size x batch_size (both the prompt-size sweep and
    the batch sweep). Decode, `decode_axis="batch"` (ours): median token time against batch
    size, i.e. the batch sweep at its 512-token contexts (45 ms at 1, 72 ms at 64 on a DGX-A100).
    `decode_axis="tokens"` (SplitwiseSim's): median token time against prompt_size x batch_size
    read at the number of decodes, which makes a decode step nearly flat (43-46 ms for 1 to
    8192 decodes on a DGX-A100). A step that mixes prompt chunks and decodes is costed as a
    prefill of all its tokens times `mixed_penalty` (SplitwiseSim's convention). Context length
    does not enter beyond what the chosen axis carries.
    """

    def __init__(
        self, prefill: PiecewiseLinear, decode: PiecewiseLinear, mixed_penalty: float = 1.1
    ) -> None:
        self.prefill = prefill
        self.decode = decode
        self.mixed_penalty = mixed_penalty
        self._cache: dict[tuple[int, int], float] = {}

    @classmethod
    def from_rows(
        cls, rows: Sequence[TableRow], mixed_penalty: float = 1.1, decode_axis: str = "batch"
    ) -> TablePerfModel:
        """Build from the rows of one (model, hardware, tensor_parallel)."""
        if not rows:
            raise ValueError("no rows to build a performance model from")
        if decode_axis not in ("batch", "tokens"):
            raise ValueError(f"decode_axis: 'batch' or 'tokens', got {decode_axis!r}")
        pre: dict[int, list[float]] = defaultdict(list)
        dec: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            pre[r.prompt_size * r.batch_size].append(r.prompt_time_ms / 1e3)
            x = r.batch_size if decode_axis == "batch" else r.prompt_size * r.batch_size
            dec[x].append(r.token_time_ms / 1e3)
        px = sorted(pre)
        dx = sorted(dec)
        return cls(
            PiecewiseLinear(px, [statistics.median(pre[x]) for x in px]),
            PiecewiseLinear(dx, [statistics.median(dec[x]) for x in dx]),
            mixed_penalty,
        )

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        model: str,
        hardware: str,
        tensor_parallel: int | None = None,
        decode_axis: str = "batch",
    ) -> TablePerfModel:
        """The model for one (model, hardware[, tensor_parallel]) of a table file."""
        rows = read_table(path)
        sel = [
            r
            for r in rows
            if r.model == model
            and r.hardware == hardware
            and (tensor_parallel is None or r.tensor_parallel == tensor_parallel)
        ]
        if not sel:
            have = sorted({(r.model, r.hardware, r.tensor_parallel) for r in rows})
            raise ValueError(
                f"{path}: no rows for model={model!r} hardware={hardware!r} "
                f"tensor_parallel={tensor_parallel}; the table has {have}"
            )
        if tensor_parallel is None and len({r.tensor_parallel for r in sel}) > 1:
            raise ValueError(
                f"{path}: several tensor_parallel values for {model}/{hardware}; pick one"
            )
        return cls.from_rows(sel, decode_axis=decode_axis)

    def step_time(self, prefill_tokens: int, num_decodes: int) -> float:
        """Seconds for one step (memoised: the same shapes recur constantly)."""
        key = (prefill_tokens, num_decodes)
        t = self._cache.get(key)
        if t is None:
            if prefill_tokens == 0:
                t = self.decode(num_decodes)
            elif num_decodes == 0:
                t = self.prefill(prefill_tokens)
            else:
                t = self.prefill(prefill_tokens + num_decodes) * self.mixed_penalty
            assert t > 0, f"non-positive step time for {key}"
            self._cache[key] = t
        return t


class ConstantPerfModel:
    """Fixed step times (closed-form tests): one for steps with prompt work, one for pure decode."""

    def __init__(self, prefill_s: float, decode_s: float) -> None:
        self.prefill_s = prefill_s
        self.decode_s = decode_s

    def step_time(self, prefill_tokens: int, num_decodes: int) -> float:
        """prefill_s if any prompt token is computed, else decode_s."""
        return self.prefill_s if prefill_tokens else self.decode_s


def write_table(path: str | Path, rows: Sequence[TableRow]) -> None:
    """Write rows in the profile-table format (powers left at zero: measured elsewhere)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TABLE_COLUMNS)
        for r in rows:
            e2e = r.prompt_time_ms + r.token_time_ms * max(0, r.token_size - 1)
            w.writerow(
                [
                    r.model,
                    r.hardware,
                    r.prompt_size,
                    r.batch_size,
                    r.token_size,
                    0.0,
                    0.0,
                    r.prompt_time_ms,
                    r.token_time_ms,
                    e2e,
                    r.tensor_parallel,
                ]
            )

"""Online auto-tuner of expert-parallel settings (overlap degree, capacity factor) per batch bucket.

Every rank feeds it the same numbers (the max over ranks of the previous forward's MoE time, carried
in the forward's own count all-gather), so every rank makes the same choice with no extra message.
Per bucket (global tokens rounded up to a power of two) it first tries each candidate a few times,
then keeps the fastest by median (candidates explored round-robin), re-measures one other candidate
every `probe_every` forwards against the current choice's neighbouring times, and switches only when
another is faster by more than `hysteresis` over several probes. Choices are logged and kept in
`stats` (typed) for the metrics module.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EPSettings:
    """The per-forward knobs of expert parallelism (no weight movement to change them)."""

    overlap: int = 1  # chunks pipelined through all-to-all and expert compute
    capacity_factor: float = 0.0  # rows per (source, expert, round) cap; 0 = uncapped

    def __post_init__(self) -> None:
        if self.overlap < 1:
            raise ValueError(f"overlap: must be >= 1, got {self.overlap}")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor: must be >= 0, got {self.capacity_factor}")


@dataclass(frozen=True)
class TunerDecision:
    """One change of a bucket's setting."""

    forward: int
    bucket: int
    settings: EPSettings
    reason: str  # "explored" or "switch"
    median_s: float


@dataclass
class BucketStats:
    """A bucket's current choice and its measurements."""

    current: EPSettings
    medians_s: dict[EPSettings, float] = field(default_factory=dict)
    samples: dict[EPSettings, int] = field(default_factory=dict)
    switches: int = 0
    explored: bool = False


@dataclass
class EPTunerStats:
    """What the tuner chose (the metrics module exports these)."""

    forwards: int = 0
    buckets: dict[int, BucketStats] = field(default_factory=dict)
    decisions: list[TunerDecision] = field(default_factory=list)


def bucket_of(num_tokens: int) -> int:
    """Power-of-two bucket of a global token count."""
    return 1 << max(0, int(num_tokens) - 1).bit_length()


class EPTuner:
    """Measures candidates online and keeps the fastest per bucket, with hysteresis."""

    def __init__(
        self,
        candidates: Sequence[EPSettings],
        samples_per_candidate: int = 3,
        hysteresis: float = 0.05,
        probe_every: int = 16,
        window: int = 5,
        min_probes: int = 3,
    ) -> None:
        if not candidates:
            raise ValueError("candidates: need at least one EPSettings")
        if samples_per_candidate < 1 or window < 1 or probe_every < 1:
            raise ValueError("samples_per_candidate, window and probe_every must be >= 1")
        if not 0 <= hysteresis < 1:
            raise ValueError(f"hysteresis: must be in [0, 1), got {hysteresis}")
        self.candidates = list(dict.fromkeys(candidates))
        self.samples_per_candidate = samples_per_candidate
        self.hysteresis = hysteresis
        self.probe_every = probe_every
        self.window = max(window, samples_per_candidate)
        self.min_probes = max(1, min_probes)
        self.stats = EPTunerStats()
        self._times: dict[int, dict[EPSettings, deque[float]]] = {}
        self._seen: dict[int, int] = {}
        self._probe_next: dict[int, int] = {}
        self._pending: tuple[int, EPSettings] | None = None
        self._recent: dict[int, deque[float]] = {}  # per bucket: the current choice's last times
        self._ratios: dict[int, dict[EPSettings, deque[float]]] = {}  # probe / current times

    def choose(self, num_tokens: int) -> EPSettings:
        """The settings for a forward of `num_tokens` global tokens (its time comes to `observe`)."""
        b = bucket_of(num_tokens)
        times = self._times.setdefault(b, {c: deque(maxlen=self.window) for c in self.candidates})
        bs = self.stats.buckets.setdefault(b, BucketStats(current=self.candidates[0]))
        seen = self._seen.get(b, 0)
        self._seen[b] = seen + 1
        self.stats.forwards += 1
        todo = [c for c in self.candidates if len(times[c]) < self.samples_per_candidate]
        if todo:  # explore round-robin, so slow drift of the machine hits every candidate alike
            pick = min(todo, key=lambda c: len(times[c]))
        elif seen % self.probe_every == 0 and len(self.candidates) > 1:
            others = [c for c in self.candidates if c != bs.current]
            i = self._probe_next.get(b, 0)
            self._probe_next[b] = i + 1
            pick = others[i % len(others)]
        else:
            pick = bs.current
        self._pending = (b, pick)
        return pick

    def observe(self, elapsed_s: float) -> None:
        """The time of the forward last chosen (max over ranks); updates the bucket's choice.

        After exploration, a probe is compared with the current choice's latest times (its
        neighbours), not with samples taken minutes apart, so drifting machine load cannot fake a
        winner; a switch needs the median of a candidate's last probe ratios below 1 - hysteresis.
        """
        if self._pending is None:
            return
        b, used = self._pending
        self._pending = None
        t = float(elapsed_s)
        times = self._times[b]
        times[used].append(t)
        bs = self.stats.buckets[b]
        bs.samples[used] = bs.samples.get(used, 0) + 1
        bs.medians_s = {c: statistics.median(v) for c, v in times.items() if v}
        if not bs.explored:
            if any(len(v) < self.samples_per_candidate for v in times.values()):
                return
            bs.explored = True
            best = min(bs.medians_s, key=lambda c: (bs.medians_s[c], self.candidates.index(c)))
            self._set(b, bs, best, "explored")
            return
        recent = self._recent.setdefault(b, deque(maxlen=3))
        ratios = self._ratios.setdefault(b, {})
        if used == bs.current:
            recent.append(t)
            return
        if not recent:
            return
        r = ratios.setdefault(used, deque(maxlen=self.window))
        r.append(t / statistics.median(recent))
        if len(r) >= self.min_probes and statistics.median(r) < 1 - self.hysteresis:
            bs.switches += 1
            self._set(b, bs, used, "switch")
            ratios.clear()  # every ratio was against the old choice
            recent.clear()
            recent.append(t)

    def _set(self, b: int, bs: BucketStats, choice: EPSettings, reason: str) -> None:
        """Record and log a bucket's new choice."""
        bs.current = choice
        d = TunerDecision(self.stats.forwards, b, choice, reason, bs.medians_s[choice])
        self.stats.decisions.append(d)
        log.info(
            "ep tuner: bucket %d -> overlap=%d capacity_factor=%g (%s, median %.3f ms)",
            b,
            choice.overlap,
            choice.capacity_factor,
            reason,
            d.median_s * 1e3,
        )

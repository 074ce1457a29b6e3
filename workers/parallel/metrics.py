"""Per-step timing and traffic of one sequence-parallel attention call."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class StepMetrics:
    """One step of a schedule on one rank.

    comm_s runs from posting the step's sends/receives to seeing them complete; exposed_comm_s is the
    part spent blocked waiting for them after the step's compute, so the rest was hidden behind it.
    Completion is stamped by a helper thread blocked in the transfer's wait (see comm.Pending).
    """

    step: int
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    bytes_sent: int  # payload bytes this rank handed to sends in this step (all links)
    bytes_recv: int

    @property
    def hidden_fraction(self) -> float:
        """Share of this step's communication time that overlapped compute (1.0 with no comm)."""
        if self.comm_s <= 0.0:
            return 1.0
        return max(0.0, min(1.0, 1.0 - self.exposed_comm_s / self.comm_s))


@dataclass(frozen=True)
class SPMetrics:
    """All steps of one call on one rank."""

    schedule: str
    world_size: int
    rank: int
    steps: tuple[StepMetrics, ...]
    total_s: float

    @property
    def compute_s(self) -> float:
        """Compute time summed over steps."""
        return sum(s.compute_s for s in self.steps)

    @property
    def comm_s(self) -> float:
        """Communication time summed over steps."""
        return sum(s.comm_s for s in self.steps)

    @property
    def exposed_comm_s(self) -> float:
        """Communication time not hidden behind compute."""
        return sum(s.exposed_comm_s for s in self.steps)

    @property
    def hidden_fraction(self) -> float:
        """Share of all communication time hidden behind compute."""
        comm = self.comm_s
        return 1.0 if comm <= 0.0 else max(0.0, min(1.0, 1.0 - self.exposed_comm_s / comm))

    @property
    def bytes_sent(self) -> int:
        """Payload bytes sent over all steps."""
        return sum(s.bytes_sent for s in self.steps)


@dataclass
class StepRecorder:
    """Mutable accumulator for one step while it runs (internal to the schedules)."""

    step: int
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_comm_s: float = 0.0
    bytes_sent: int = 0
    bytes_recv: int = 0

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Add the wall time of the `with` body to this step's compute time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.compute_s += time.perf_counter() - t0

    def freeze(self) -> StepMetrics:
        """The finished step."""
        return StepMetrics(
            self.step,
            self.compute_s,
            self.comm_s,
            self.exposed_comm_s,
            self.bytes_sent,
            self.bytes_recv,
        )

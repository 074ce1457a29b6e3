"""A log of the cluster-level scheduler's decisions (views in, decision out), and its replay.

Attach a `DecisionLog` as `ClusterScheduler.recorder` (live cluster or simulator alike) to keep
every `schedule` call; `replay` feeds the recorded snapshots to a fresh scheduler, which must
decide the same, since `schedule` is a function of its inputs and the policy's own state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from batonserve.cluster.scheduling.config import SchedulerConfig
from batonserve.cluster.scheduling.types import Decision, RequestView, WorkerView


@dataclass(frozen=True)
class DecisionRecord:
    """One `schedule` call: the request, the worker snapshots it saw, and what it decided."""

    request: RequestView
    workers: tuple[WorkerView, ...]
    decision: Decision


class DecisionRecorder(Protocol):
    """Receives every decision the scheduler makes, in order."""

    def record(self, rec: DecisionRecord) -> None:
        """Keep one decision."""
        ...


class DecisionLog:
    """A `DecisionRecorder` that keeps every record in memory, in decision order."""

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def record(self, rec: DecisionRecord) -> None:
        """Append one decision."""
        self.records.append(rec)

    def decisions(self) -> list[Decision]:
        """The decisions alone, in order."""
        return [r.decision for r in self.records]

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.records.clear()


def replay(records: Sequence[DecisionRecord], config: SchedulerConfig) -> list[Decision]:
    """The decisions a fresh scheduler makes on the recorded requests and snapshots, in order.

    Prefix caching is not replayed (a fresh scheduler caches nothing), so records of requests
    that hit a cached prefix may differ; every other decision must come out the same.
    """
    from batonserve.cluster.scheduling.scheduler import ClusterScheduler

    cls = ClusterScheduler(config)
    return [cls.schedule(r.request, r.workers) for r in records]

"""Where the cluster reports what happened (the router's Metrics implements this protocol)."""

from __future__ import annotations

import time
from typing import Protocol

from batonserve.cluster.controller import Controller
from batonserve.cluster.handoff import Handoff
from batonserve.cluster.metrics_inputs import (
    HandoffOutcome,
    HandoffRecord,
    PoolChange,
    WorkerSnapshot,
)
from batonserve.workers.expert_store.types import ExpertStoreStats
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.sp_serving.report import SPStepReport


class ClusterObserver(Protocol):
    """Receives typed records; names and exports nothing itself."""

    def worker_snapshot(self, snap: WorkerSnapshot) -> None:
        """A worker's latest stats."""
        ...

    def worker_restarted(self, pool: str, worker: str) -> None:
        """A dead worker was replaced."""
        ...

    def worker_removed(self, worker: str) -> None:
        """A worker left for good (drained by a scale-down)."""
        ...

    def kv_handoff(self, rec: HandoffRecord) -> None:
        """A handoff ended."""
        ...

    def pool_change(self, change: PoolChange) -> None:
        """A worker was borrowed into or returned from the mixed pool."""
        ...

    def sequence_parallel(self, report: SPStepReport) -> None:
        """One rank's step of a ring prefill."""
        ...

    def moe(self, worker: str, pool: str, stats: ExpertStoreStats) -> None:
        """A worker's expert-store totals (MoE models served from the tiered store)."""
        ...

    def ep_tuner(self, worker: str, pool: str, stats: EPTunerStats) -> None:
        """A worker's expert-parallel tuner stats (its choice per token bucket, its totals)."""
        ...

    def iteration_tokens(self, worker: str, pool: str, tokens: tuple[int, ...]) -> None:
        """Tokens computed by each of a worker's engine steps since its last poll."""
        ...


class NullObserver:
    """Drops every record (no metrics wired)."""

    def worker_snapshot(self, snap: WorkerSnapshot) -> None:
        """Ignored."""

    def worker_restarted(self, pool: str, worker: str) -> None:
        """Ignored."""

    def worker_removed(self, worker: str) -> None:
        """Ignored."""

    def kv_handoff(self, rec: HandoffRecord) -> None:
        """Ignored."""

    def pool_change(self, change: PoolChange) -> None:
        """Ignored."""

    def sequence_parallel(self, report: SPStepReport) -> None:
        """Ignored."""

    def moe(self, worker: str, pool: str, stats: ExpertStoreStats) -> None:
        """Ignored."""

    def ep_tuner(self, worker: str, pool: str, stats: EPTunerStats) -> None:
        """Ignored."""

    def iteration_tokens(self, worker: str, pool: str, tokens: tuple[int, ...]) -> None:
        """Ignored."""


def handoff_record(controller: Controller, h: Handoff, outcome: HandoffOutcome) -> HandoffRecord:
    """The metrics record of a handoff that ended with `outcome`."""
    pools = {n: w.spec.pool for n, w in controller.workers.items()}
    end = h.committed_at if h.committed_at else time.monotonic()
    return HandoffRecord(
        from_pool=pools.get(h.src, h.src),
        to_pool=pools.get(h.dst, h.dst),
        seconds=max(0.0, end - h.opened_at),
        bytes=h.nbytes,
        outcome=outcome,
    )

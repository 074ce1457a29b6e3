"""A ClusterObserver for tests that keeps what the cluster reports (handoffs, pool changes, SP, EP)."""

from __future__ import annotations

from batonserve.cluster.metrics_inputs import HandoffRecord, PoolChange
from batonserve.cluster.observer import NullObserver
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.sp_serving.report import SPStepReport


class Recorder(NullObserver):
    """Records handoff outcomes (which path a request took), pool changes, SP and EP tuner reports."""

    def __init__(self) -> None:
        self.handoffs: list[HandoffRecord] = []
        self.pool_changes: list[PoolChange] = []
        self.sp: list[SPStepReport] = []
        self.ep_tuners: list[tuple[str, str, EPTunerStats]] = []  # (worker, pool, stats)

    def kv_handoff(self, rec: HandoffRecord) -> None:
        self.handoffs.append(rec)

    def pool_change(self, change: PoolChange) -> None:
        self.pool_changes.append(change)

    def sequence_parallel(self, report: SPStepReport) -> None:
        self.sp.append(report)

    def ep_tuner(self, worker: str, pool: str, stats: EPTunerStats) -> None:
        self.ep_tuners.append((worker, pool, stats))

    def outcomes(self) -> list[str]:
        return [r.outcome for r in self.handoffs]

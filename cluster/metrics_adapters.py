"""Adapters from the producers' own typed objects to the metrics inputs.

The cluster-level scheduler's decisions and events become `metrics_inputs` objects here, so
callers never spell series or label names (worker statistics: `cluster/worker_stats.py`).
Foreign types are imported for type checking only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batonserve.cluster.metrics_inputs import PoolChange, RequestRejected

if TYPE_CHECKING:
    from batonserve.cluster.scheduling.types import Rejection, RoleChange


def rejection_from_scheduler(rej: Rejection) -> RequestRejected:
    """The cluster scheduler's refusal as a metrics rejection (reason = the enum's value)."""
    return RequestRejected(reason=str(rej.reason.value))


def pool_change_from_role_change(change: RoleChange, pool: str) -> PoolChange:
    """A mixed-pool `RoleChange` of a worker whose home pool is `pool`."""
    return PoolChange(
        pool=pool, change=change.kind, from_role=change.from_role, to_role=change.to_role
    )


__all__ = [
    "pool_change_from_role_change",
    "rejection_from_scheduler",
]

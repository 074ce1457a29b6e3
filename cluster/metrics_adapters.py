"""Adapters from the producers' own typed objects to the metrics inputs.

The engine, the worker actors and the cluster-level scheduler each have their stats or event
types; these functions turn them into `metrics_inputs` objects, so callers never spell series or
label names. Foreign types are imported for type checking only: the metrics module stays
importable without the data plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batonserve.cluster.metrics_inputs import PoolChange, RequestRejected, WorkerSnapshot

if TYPE_CHECKING:
    from batonserve.cluster.scheduling.types import Rejection, RoleChange
    from batonserve.workers.scheduler import SchedulerStats
    from batonserve.workers.worker_types import WorkerStats


def snapshot_from_worker_stats(stats: WorkerStats, role: str | None = None) -> WorkerSnapshot:
    """A worker actor's `WorkerStats` (from its poll result) as a metrics snapshot.

    `role`: the controller's view, when it differs from the one the worker last reported.
    """
    return WorkerSnapshot(
        worker=stats.name,
        pool=stats.pool,
        role=role or stats.role,
        kv_cache_usage=min(max(stats.kv_usage, 0.0), 1.0),
        running=stats.running,
        waiting=stats.waiting,
        prefix_cache_queries=stats.prefix_queries,
        prefix_cache_hits=stats.prefix_hits,
        pending_prefill_tokens=stats.pending_prefill_tokens,
        preemptions=stats.preemptions,
        regroup_deferred=stats.regroup_deferred,
        block_size=stats.block_size,
        num_blocks=stats.num_blocks,
    )


def snapshot_from_engine_stats(
    worker: str, pool: str, role: str, stats: SchedulerStats
) -> WorkerSnapshot:
    """The engine scheduler's `SchedulerStats` of worker `worker` as a metrics snapshot."""
    return WorkerSnapshot(
        worker=worker,
        pool=pool,
        role=role,
        kv_cache_usage=min(max(stats.kv_usage, 0.0), 1.0),
        running=stats.num_running,
        waiting=stats.num_waiting,
        prefix_cache_queries=stats.prefix_queries,
        prefix_cache_hits=stats.prefix_hits,
        pending_prefill_tokens=stats.pending_prefill_tokens,
        preemptions=stats.num_preemptions,
        regroup_deferred=stats.regroup_deferred,
    )


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
    "snapshot_from_engine_stats",
    "snapshot_from_worker_stats",
]

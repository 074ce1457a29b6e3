"""Worker statistics as each reader sees them: one function per target, used by every producer.

A live worker reports `WorkerStats` on each poll (built from its engine's `SchedulerStats`); a
simulated worker exposes the same load figures on itself. The cluster-level scheduler reads a
`WorkerView`, GetServerInfo a `WorkerInfo`, the metrics a `WorkerSnapshot`; this module alone
turns the one into the others, so the live cluster and the simulator cannot drift apart.
Torch-free: the router and the simulator import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from batonserve.cluster.api import WorkerInfo
from batonserve.cluster.metrics_inputs import WorkerSnapshot
from batonserve.cluster.scheduling.types import Role, WorkerView

if TYPE_CHECKING:
    from batonserve.workers.worker_types import WorkerStats

DEFAULT_BLOCK_SIZE = 16  # what a worker that has not reported yet is assumed to use


class LoadFigures(Protocol):
    """The load figures the scheduler reads (`WorkerStats` and the simulator's worker have them)."""

    @property
    def running(self) -> int:
        """Requests in the continuous batch."""
        ...

    @property
    def waiting(self) -> int:
        """Requests queued, not yet admitted to the batch."""
        ...

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens queued or partly prefilled, not yet computed."""
        ...

    @property
    def num_free_blocks(self) -> int:
        """KV blocks free to new requests: free blocks less those promised to handoffs."""
        ...

    @property
    def num_blocks(self) -> int:
        """All KV blocks."""
        ...

    @property
    def block_size(self) -> int:
        """Tokens per KV block."""
        ...


def worker_view(
    worker_id: str,
    pool: str,
    home_role: Role,
    role: Role,
    load: LoadFigures | None,
    *,
    healthy: bool = True,
    draining: bool = False,
    machine: str = "",
) -> WorkerView:
    """The scheduler's snapshot of one worker; `load` None: it has not reported yet (no room)."""
    if load is None:
        return WorkerView(
            worker_id,
            pool,
            home_role,
            role,
            healthy=healthy,
            block_size=DEFAULT_BLOCK_SIZE,
            machine=machine,
            draining=draining,
        )
    return WorkerView(
        worker_id=worker_id,
        pool=pool,
        home_role=home_role,
        role=role,
        healthy=healthy,
        pending_prefill_tokens=load.pending_prefill_tokens,
        running=load.running,
        waiting=load.waiting,
        num_free_blocks=max(0, load.num_free_blocks),
        num_total_blocks=load.num_blocks,
        block_size=load.block_size,
        machine=machine,
        draining=draining,
    )


def worker_info(
    name: str, pool: str, role: str, healthy: bool, stats: WorkerStats | None
) -> WorkerInfo:
    """One worker as GetServerInfo reports it (zero load before its first report)."""
    return WorkerInfo(
        name=name,
        pool=pool,
        role=role,
        healthy=healthy,
        running_requests=stats.running if stats else 0,
        waiting_requests=stats.waiting if stats else 0,
        pending_prefill_tokens=stats.pending_prefill_tokens if stats else 0,
        kv_cache_usage=stats.kv_usage if stats else 0.0,
        tensor_parallel_size=stats.tensor_parallel_size if stats else 1,
        rank_param_bytes=stats.rank_param_bytes if stats else (),
    )


def worker_snapshot(stats: WorkerStats, role: str | None = None) -> WorkerSnapshot:
    """A worker actor's `WorkerStats` (from its poll result) as a metrics snapshot.

    `role`: the controller's view, when it differs from the one the worker last reported.
    """
    return WorkerSnapshot(
        worker=stats.name,
        pool=stats.pool,
        role=role or stats.role,
        kv_cache_usage=min(max(stats.kv_usage, 0.0), 1.0),
        rank_param_bytes=stats.rank_param_bytes,
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


__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "LoadFigures",
    "worker_info",
    "worker_snapshot",
    "worker_view",
]

"""Snapshot builders shared by the scheduling tests."""

from __future__ import annotations

from batonserve.cluster.scheduling import Role, WorkerView


def worker(
    wid: str,
    role: Role,
    *,
    home: Role | None = None,
    pending: int = 0,
    running: int = 0,
    waiting: int = 0,
    free: int = 100,
    total: int = 100,
    healthy: bool = True,
) -> WorkerView:
    """A worker view with 16-token blocks; `free`/`total` are in blocks."""
    return WorkerView(
        worker_id=wid,
        pool=(home or role),
        home_role=home or role,
        role=role,
        healthy=healthy,
        pending_prefill_tokens=pending,
        running=running,
        waiting=waiting,
        num_free_blocks=free,
        num_total_blocks=total,
        block_size=16,
    )

"""Sequence-parallel attention schedules, one file each, and their registry.

Torch-free until a schedule is used: the `sequence_parallel` config checks its names here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batonserve.workers.lazy_exports import lazy_exports
from batonserve.workers.plugins import Registry

if TYPE_CHECKING:
    from batonserve.workers.parallel.schedules.base import (
        AttentionDims,
        GroupMeta,
        LinkBytes,
        Schedule,
        ScheduleResult,
    )

# The one list of schedules: name -> "module:class", imported when a schedule runs or is costed.
SCHEDULES: Registry[type[Schedule]] = Registry(
    "sequence-parallel schedule",
    "sequence_parallel.schedule",
    __name__,
    {
        "ring": "ring:RingSchedule",
        "tokenring": "tokenring:TokenRingSchedule",
        "allgather": "allgather:AllGatherSchedule",
    },
)


def get_schedule(name: str) -> Schedule:
    """The schedule registered as `name` (schedules are stateless)."""
    return SCHEDULES.get(name)()


_exports = lazy_exports(
    __name__,
    {
        name: "base"
        for name in ("AttentionDims", "GroupMeta", "LinkBytes", "Schedule", "ScheduleResult")
    },
)


def __getattr__(name: str) -> Any:
    return _exports(name)


__all__ = [
    "SCHEDULES",
    "AttentionDims",
    "GroupMeta",
    "LinkBytes",
    "Schedule",
    "ScheduleResult",
    "get_schedule",
]

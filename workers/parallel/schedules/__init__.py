"""Sequence-parallel attention schedules: one file each, registered by name on import."""

from batonserve.workers.parallel.schedules import allgather, ring, tokenring
from batonserve.workers.parallel.schedules.base import (
    SCHEDULES,
    AttentionDims,
    GroupMeta,
    LinkBytes,
    Schedule,
    ScheduleResult,
    get_schedule,
)

__all__ = [
    "SCHEDULES",
    "AttentionDims",
    "GroupMeta",
    "LinkBytes",
    "Schedule",
    "ScheduleResult",
    "allgather",
    "get_schedule",
    "ring",
    "tokenring",
]

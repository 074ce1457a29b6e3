"""Typed snapshots and decisions that cross the cluster-level scheduler's boundary.

The live cluster (Ray) and the simulator both build these views from their own workers and hand
them to the very same scheduler code; nothing here knows about Ray, torch or gRPC.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from batonserve.workers.config import Role

PairingMode = Literal["disaggregated", "in_place"]

PREFILL_CAPABLE: frozenset[str] = frozenset({"prefill", "mixed"})
DECODE_CAPABLE: frozenset[str] = frozenset({"decode", "mixed"})


@dataclass(frozen=True)
class WorkerView:
    """What the scheduler knows about one worker at one instant (a snapshot, never live state)."""

    worker_id: str  # e.g. "prefill-0"
    pool: str
    home_role: Role  # the pool's role; differs from `role` while the worker is borrowed
    role: Role  # the current role
    healthy: bool = True
    pending_prefill_tokens: int = 0  # prompt tokens queued or partly prefilled, not yet computed
    running: int = 0  # requests in the continuous batch
    waiting: int = 0  # requests queued, not yet admitted to the batch
    num_free_blocks: int = 0  # KV blocks an incoming request can take (minus reservations)
    num_total_blocks: int = 0
    block_size: int = 16
    machine: str = ""  # machine type, e.g. "h100-80gb" (informational)
    draining: bool = False  # being removed (scale-down): finishes its requests, takes no new ones

    @property
    def schedulable(self) -> bool:
        """May take new pairings and role changes: healthy and not draining."""
        return self.healthy and not self.draining

    @property
    def free_kv_tokens(self) -> int:
        """Token slots in free KV blocks."""
        return self.num_free_blocks * self.block_size

    @property
    def total_kv_tokens(self) -> int:
        """Token slots in all KV blocks."""
        return self.num_total_blocks * self.block_size

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0..1); 1.0 for a worker without KV blocks."""
        if self.num_total_blocks <= 0:
            return 1.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def borrowed(self) -> bool:
        """True while the mixed pool has lent this worker out of its home role."""
        return self.role != self.home_role


@dataclass(frozen=True)
class RequestView:
    """What the scheduler needs to know about one arriving request."""

    request_id: str
    prompt_len: int
    max_tokens: int
    # Chained hashes of the prompt's *full* blocks, in order, as the engine's block pool computes
    # them (batonserve.workers.block_pool.hash_blocks); equal hashes mean equal whole prefixes.
    prefix_block_hashes: tuple[int, ...] = ()
    arrival_time: float = 0.0

    def __post_init__(self) -> None:
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be at least 1, got {self.prompt_len}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Pairing:
    """The scheduler's choice: where the prompt is computed and where the tokens are generated."""

    request_id: str
    prefill_worker: str
    decode_worker: str
    mode: PairingMode  # "in_place": prefill_worker == decode_worker, no KV handoff
    cached_prefix_tokens: int = 0  # prompt tokens already cached on the worker that prefills

    def __post_init__(self) -> None:
        same = self.prefill_worker == self.decode_worker
        assert same == (self.mode == "in_place"), "in_place iff one worker does both phases"


class RejectReason(str, enum.Enum):
    """Why a request was refused at arrival (the router maps every one to RESOURCE_EXHAUSTED)."""

    QUEUE_FULL = "queue_full"  # every prefill-capable worker is over its queue limits
    KV_EXHAUSTED = "kv_exhausted"  # no decode-capable worker has the KV room (plus headroom)
    NO_HEALTHY_WORKER = "no_healthy_worker"  # a phase has no healthy worker at all
    PROMPT_TOO_LONG = "prompt_too_long"  # the request can never fit, whatever the load


@dataclass(frozen=True)
class Rejection:
    """A refusal, decided at once, with a reason and a human-readable message."""

    request_id: str
    reason: RejectReason
    message: str


Decision = Pairing | Rejection

RoleChangeKind = Literal["borrow", "return"]
PressureKind = Literal["prefill_pressure", "decode_pressure"]


@dataclass(frozen=True)
class RoleChange:
    """A mixed-pool event: the caller must switch `worker_id` to `to_role` (no weight reload)."""

    worker_id: str
    kind: RoleChangeKind
    from_role: Role
    to_role: Role
    reason: PressureKind
    time: float

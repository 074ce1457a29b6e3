"""Typed inputs of the metrics module: plain data the router and the cluster hand to `Metrics`.

Producers never name series; they describe what happened with these small frozen objects and
`batonserve.cluster.metrics.Metrics` decides which series move. None of them carries a request
id: per-request identity must never become a label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from batonserve.cluster.scheduling.types import RoleChangeKind

# "cancelled": the request ended (finished on its first token, or its client left) while its
# handoff was still open; not a failure.
HandoffOutcome = Literal["ok", "failed", "lease_expired", "cancelled"]

# gRPC status code names (grpc.StatusCode.<NAME>.name); the router passes the final code's name.
GRPC_CODES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
FINISH_REASONS = frozenset({"stop", "length", "abort"})


def _check_non_negative(owner: str, **values: float) -> None:
    """Raise ValueError naming the first field that is negative or not finite."""
    for name, value in values.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{owner}.{name}: must be a finite number >= 0, got {value!r}")


def _check_label(owner: str, name: str, value: str) -> None:
    """Label values must be short identifiers; an empty one would merge unrelated series."""
    if not value or len(value) > 128:
        raise ValueError(
            f"{owner}.{name}: must be a non-empty string of <= 128 chars, got {value!r}"
        )


@dataclass(frozen=True)
class RequestFinished:
    """One admitted request ended (successfully or not); call once per admitted request."""

    code: str  # final gRPC status code name, e.g. "OK", "CANCELLED", "UNAVAILABLE"
    finish_reason: str | None  # "stop", "length", "abort", or None when it ended by error
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache
    duration_seconds: float  # admission to last byte sent
    started: bool  # True if request_started was reported (it left the waiting state)
    # vLLM's request phases, when known: admission to first scheduled (queue), first scheduled
    # to first token (prefill), first to last token (decode), first scheduled to last token.
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    inference_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.code not in GRPC_CODES:
            raise ValueError(f"RequestFinished.code: not a gRPC status code name: {self.code!r}")
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"RequestFinished.finish_reason: must be one of {sorted(FINISH_REASONS)} "
                f"or None, got {self.finish_reason!r}"
            )
        _check_non_negative(
            "RequestFinished",
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            cached_tokens=self.cached_tokens,
            duration_seconds=self.duration_seconds,
        )
        for name in ("queue_seconds", "prefill_seconds", "decode_seconds", "inference_seconds"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"RequestFinished.{name}: must be a finite number >= 0")


@dataclass(frozen=True)
class RequestRejected:
    """A request refused before admission (it never counts as in flight)."""

    reason: str  # short snake_case cause, e.g. "queue_full", "kv_exhausted", "slo_at_risk"
    code: str = "RESOURCE_EXHAUSTED"

    def __post_init__(self) -> None:
        _check_label("RequestRejected", "reason", self.reason)
        if self.code not in GRPC_CODES:
            raise ValueError(f"RequestRejected.code: not a gRPC status code name: {self.code!r}")


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker's stats as of its latest step; prefix-cache fields are monotonic totals."""

    worker: str  # actor name, e.g. "decode-0"
    pool: str
    role: str  # current role: prefill, decode or mixed
    kv_cache_usage: float  # used KV blocks / total KV blocks, 0..1
    running: int  # requests in the running batch
    waiting: int  # requests queued on the worker
    prefix_cache_queries: int  # tokens looked up in the prefix cache since the worker started
    prefix_cache_hits: int  # of those, tokens found
    pending_prefill_tokens: int = 0  # prompt tokens queued or partly prefilled (the CLS's key)
    preemptions: int = 0  # requests preempted since the worker started (monotonic)
    regroup_deferred: int = 0  # decode tokens token regrouping held back a step (monotonic)
    block_size: int = 0  # KV cache layout, for cache_config_info (0: unknown)
    num_blocks: int = 0
    rank_param_bytes: tuple[int, ...] = ()  # per tensor-parallel rank (one entry without TP)

    def __post_init__(self) -> None:
        for name in ("worker", "pool", "role"):
            _check_label("WorkerSnapshot", name, getattr(self, name))
        if not 0.0 <= self.kv_cache_usage <= 1.0:
            raise ValueError(
                f"WorkerSnapshot.kv_cache_usage: must be in [0, 1], got {self.kv_cache_usage!r}"
            )
        _check_non_negative(
            "WorkerSnapshot",
            running=self.running,
            waiting=self.waiting,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            pending_prefill_tokens=self.pending_prefill_tokens,
            preemptions=self.preemptions,
            regroup_deferred=self.regroup_deferred,
        )
        if self.prefix_cache_hits > self.prefix_cache_queries:
            raise ValueError(
                "WorkerSnapshot.prefix_cache_hits: cannot exceed prefix_cache_queries "
                f"({self.prefix_cache_hits} > {self.prefix_cache_queries})"
            )


@dataclass(frozen=True)
class HandoffRecord:
    """One KV-cache handoff from a prefill worker's pool to a decode worker's pool."""

    from_pool: str
    to_pool: str
    seconds: float  # first layer sent to last layer acknowledged
    bytes: int  # KV bytes moved (what arrived, for a failed one)
    outcome: HandoffOutcome = "ok"

    def __post_init__(self) -> None:
        _check_label("HandoffRecord", "from_pool", self.from_pool)
        _check_label("HandoffRecord", "to_pool", self.to_pool)
        _check_non_negative("HandoffRecord", seconds=self.seconds, bytes=self.bytes)
        if self.outcome not in get_args(HandoffOutcome):
            raise ValueError(
                f"HandoffRecord.outcome: must be one of {list(get_args(HandoffOutcome))}, "
                f"got {self.outcome!r}"
            )


@dataclass(frozen=True)
class PoolChange:
    """A worker moved into or out of the mixed pool (Splitwise), keeping its weights."""

    pool: str  # the worker's home pool
    change: RoleChangeKind  # "borrow": lent to the mixed pool; "return": back home
    from_role: str
    to_role: str

    def __post_init__(self) -> None:
        if self.change not in get_args(RoleChangeKind):
            raise ValueError(
                f"PoolChange.change: must be one of {list(get_args(RoleChangeKind))}, "
                f"got {self.change!r}"
            )
        for name in ("pool", "from_role", "to_role"):
            _check_label("PoolChange", name, getattr(self, name))


__all__ = [
    "FINISH_REASONS",
    "GRPC_CODES",
    "HandoffOutcome",
    "HandoffRecord",
    "PoolChange",
    "RequestFinished",
    "RequestRejected",
    "WorkerSnapshot",
]

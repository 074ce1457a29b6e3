"""The async cluster API the router calls: typed requests in, token deltas out.

The real implementation runs the cluster-level scheduler over Ray workers; tests use a fake with
scripted tokens. The router never sees Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from batonserve.workers.outputs import TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams


class AdmissionRejected(Exception):
    """The cluster cannot take the request without breaking its limits (RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, reason: str = "admission") -> None:
        super().__init__(message)
        self.reason = reason  # low-cardinality label for the rejection metrics


class ClusterUnavailable(Exception):
    """No healthy worker can serve, or the cluster is draining (UNAVAILABLE)."""


@dataclass(frozen=True)
class GenerateRequest:
    """One request as the router hands it to the cluster, already tokenized and validated."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams


@dataclass(frozen=True)
class Usage:
    """Token counts reported with the last delta."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of one request since the last delta; the last one has finish_reason and usage."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None  # "stop", "length" or "abort"
    usage: Usage | None = None
    # Aligned with token_ids when the request asked for logprobs (None where one is unknown).
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    # When a worker first scheduled the request (time.monotonic() of the router's process), once
    # known: the end of its queue time for the metrics. None from clusters that cannot tell.
    scheduled_at: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports."""

    name: str
    architecture: str
    context_length: int
    vocab_size: int
    is_moe: bool


@dataclass(frozen=True)
class WorkerInfo:
    """One worker as GetServerInfo reports it."""

    name: str  # e.g. "prefill-0"
    pool: str
    role: str  # prefill, decode or mixed (its current role)
    healthy: bool
    running_requests: int
    waiting_requests: int
    pending_prefill_tokens: int
    kv_cache_usage: float  # 0..1
    tensor_parallel_size: int = 1  # ranks (devices) of this worker
    rank_param_bytes: tuple[int, ...] = ()  # each rank's resident parameter bytes


@dataclass(frozen=True)
class ServerInfo:
    """What GetServerInfo reports."""

    pools: tuple[str, ...]
    workers: tuple[WorkerInfo, ...] = field(default_factory=tuple)


class ClusterAPI(Protocol):
    """What the router needs from the cluster."""

    def model_info(self) -> ModelInfo:
        """The served model."""
        ...

    def server_info(self) -> ServerInfo:
        """Pools and workers with their current roles and loads."""
        ...

    def ready(self) -> bool:
        """True when every required pool has a running worker."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Stream a request's tokens; raises AdmissionRejected or ClusterUnavailable at once."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks everywhere; idempotent."""
        ...

"""Admission limits: which workers may take one more request without breaking the config."""

from __future__ import annotations

from batonserve.cluster.scheduling.config import AdmissionConfig
from batonserve.cluster.scheduling.types import RequestView, WorkerView


def kv_need_tokens(request: RequestView, cfg: AdmissionConfig) -> int:
    """KV token slots a decode worker must have free for this request to land."""
    return request.prompt_len + min(cfg.reserve_output_tokens, request.max_tokens)


def kv_capacity_tokens(worker: WorkerView, cfg: AdmissionConfig) -> int:
    """The most KV tokens one request may take on this worker, even when it is idle."""
    return int(worker.total_kv_tokens * (1.0 - cfg.kv_headroom_fraction))


def decode_fits(worker: WorkerView, need_tokens: int, cfg: AdmissionConfig) -> bool:
    """The worker keeps its KV headroom after taking `need_tokens` more slots."""
    headroom = cfg.kv_headroom_fraction * worker.total_kv_tokens
    return worker.free_kv_tokens - need_tokens >= headroom


def prefill_fits(worker: WorkerView, prompt_tokens: int, cfg: AdmissionConfig) -> bool:
    """The worker's queue stays within limits after taking `prompt_tokens` more to prefill.

    An idle worker takes any prompt, however long, so a prompt above the per-worker limit is
    delayed rather than refused forever.
    """
    if cfg.max_queue_len and worker.waiting >= cfg.max_queue_len:
        return False
    if cfg.max_pending_prefill_tokens and worker.pending_prefill_tokens > 0:
        return worker.pending_prefill_tokens + prompt_tokens <= cfg.max_pending_prefill_tokens
    return True

"""The names of batonserve's series: one table of specs, and vLLM's histogram buckets.

`batonserve.cluster.metrics.Metrics` builds its Prometheus objects (and the Ray mirror its Ray
objects) from this table; nothing else in the project names a series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SeriesKind = Literal["counter", "gauge", "histogram"]

# vLLM's boundaries (vllm/v1/metrics/loggers.py), so a vLLM dashboard's quantiles compare 1:1.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's request_params_n
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Splitwise reports ~5-8 ms visible transfer cost; resolve sub-millisecond to multi-second.
KV_HANDOFF_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                      1.0, 2.5, 5.0, 10.0)  # fmt: skip


def token_buckets(max_model_len: int) -> tuple[float, ...]:
    """vLLM's 1-2-5 series up to the context length: 1, 2, 5, 10, 20, 50, ... <= max_model_len."""
    if max_model_len < 1:
        raise ValueError(f"max_model_len: must be >= 1, got {max_model_len}")
    out: list[float] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return tuple(out)
            out.append(float(mantissa * scale))
        scale *= 10


@dataclass(frozen=True)
class SeriesSpec:
    """One exported series: its name, type, help text, label names and histogram buckets."""

    name: str
    kind: SeriesKind
    doc: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()


_REQ = ("model",)
_WORKER = ("pool", "worker")
_HANDOFF = ("from_pool", "to_pool")
_TIER = (*_WORKER, "tier")  # gpu, ram or disk
_EXPERT = (*_WORKER, "layer", "expert")  # bounded by the model: MoE layers x experts per layer
_EP_BUCKET = (*_WORKER, "bucket")  # power-of-two token bucket: bounded by log2(max tokens)


def build_series(max_model_len: int) -> tuple[SeriesSpec, ...]:
    """Every series batonserve exports (token-length buckets depend on the context length)."""
    tok = token_buckets(max_model_len)
    s = SeriesSpec
    return (
        # Requests, as the router sees them.
        s(
            "batonserve_requests_total",
            "counter",
            "Requests that ended, by final gRPC status code and finish reason.",
            (*_REQ, "code", "finish_reason"),
        ),
        s(
            "batonserve_requests_in_flight",
            "gauge",
            "Admitted requests not yet finished (waiting + running).",
            _REQ,
        ),
        s(
            "batonserve_num_requests_waiting",
            "gauge",
            "Admitted requests no worker has scheduled yet (vLLM's num_requests_waiting).",
            _REQ,
        ),
        s(
            "batonserve_num_requests_running",
            "gauge",
            "Requests a worker has scheduled and that have not finished (num_requests_running).",
            _REQ,
        ),
        s(
            "batonserve_rejections_total",
            "counter",
            "Requests refused before admission, by reason.",
            (*_REQ, "reason"),
        ),
        s(
            "batonserve_time_to_first_token_seconds",
            "histogram",
            "Admission to first token sent.",
            _REQ,
            TTFT_BUCKETS,
        ),
        s(
            "batonserve_inter_token_latency_seconds",
            "histogram",
            "Gap between consecutive output tokens.",
            _REQ,
            ITL_BUCKETS,
        ),
        s(
            "batonserve_e2e_request_latency_seconds",
            "histogram",
            "Admission to end of stream (vLLM's e2e_request_latency_seconds).",
            _REQ,
            REQUEST_LATENCY_BUCKETS,
        ),
        s(
            "batonserve_request_queue_time_seconds",
            "histogram",
            "Admission to the worker step that first scheduled the request (queue only).",
            _REQ,
            REQUEST_LATENCY_BUCKETS,
        ),
        s(
            "batonserve_request_prefill_time_seconds",
            "histogram",
            "First scheduled to first token (the prefill phase, KV handoff included).",
            _REQ,
            REQUEST_LATENCY_BUCKETS,
        ),
        s(
            "batonserve_request_decode_time_seconds",
            "histogram",
            "First token to last token (the decode phase).",
            _REQ,
            REQUEST_LATENCY_BUCKETS,
        ),
        s(
            "batonserve_request_inference_time_seconds",
            "histogram",
            "First scheduled to last token (prefill plus decode).",
            _REQ,
            REQUEST_LATENCY_BUCKETS,
        ),
        s(
            "batonserve_request_time_per_output_token_seconds",
            "histogram",
            "Per request: decode time divided by the output tokens after the first.",
            _REQ,
            ITL_BUCKETS,
        ),
        s(
            "batonserve_request_success_total",
            "counter",
            "Requests that finished normally, by finish reason (stop, length, abort).",
            (*_REQ, "finished_reason"),
        ),
        s(
            "batonserve_request_params_max_tokens",
            "histogram",
            "The max_tokens of each admitted request.",
            _REQ,
            tok,
        ),
        s(
            "batonserve_request_params_n",
            "histogram",
            "The n (choices) of each admitted request; 1 for the gRPC APIs.",
            _REQ,
            N_BUCKETS,
        ),
        s(
            "batonserve_request_prompt_tokens",
            "histogram",
            "Prompt length of finished requests, in tokens.",
            _REQ,
            tok,
        ),
        s(
            "batonserve_request_generation_tokens",
            "histogram",
            "Generated length of finished requests, in tokens.",
            _REQ,
            tok,
        ),
        s("batonserve_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", _REQ),
        s(
            "batonserve_generation_tokens_total",
            "counter",
            "Tokens generated for finished requests.",
            _REQ,
        ),
        s(
            "batonserve_cached_prompt_tokens_total",
            "counter",
            "Prompt tokens of finished requests served from the prefix cache.",
            _REQ,
        ),
        # Workers, from their step stats.
        s(
            "batonserve_kv_cache_usage_perc",
            "gauge",
            "Used fraction of the worker's KV blocks (0-1; vLLM's kv_cache_usage_perc).",
            _WORKER,
        ),
        s(
            "batonserve_worker_tensor_parallel_size",
            "gauge",
            "Ranks (devices) of the worker: its tensor_parallel_size.",
            _WORKER,
        ),
        s(
            "batonserve_worker_rank_param_bytes",
            "gauge",
            "Resident model parameter bytes of each rank of the worker.",
            (*_WORKER, "rank"),
        ),
        s(
            "batonserve_cache_config_info",
            "gauge",
            "1 per worker, its KV cache layout in the labels (info-style, as vLLM's).",
            (*_WORKER, "block_size", "num_gpu_blocks"),
        ),
        s(
            "batonserve_iteration_tokens_total",
            "histogram",
            "Tokens computed by each engine step (prefill chunks plus decode tokens).",
            _WORKER,
            ITERATION_TOKEN_BUCKETS,
        ),
        s(
            "batonserve_worker_role",
            "gauge",
            "1 for the worker's current role (info-style).",
            (*_WORKER, "role"),
        ),
        s(
            "batonserve_worker_running_batch_size",
            "gauge",
            "Requests in the worker's running batch.",
            _WORKER,
        ),
        s("batonserve_worker_waiting_requests", "gauge", "Requests queued on the worker.", _WORKER),
        s(
            "batonserve_prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the worker's prefix cache.",
            _WORKER,
        ),
        s(
            "batonserve_prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the worker's prefix cache.",
            _WORKER,
        ),
        s(
            "batonserve_worker_pending_prefill_tokens",
            "gauge",
            "Prompt tokens queued or partly prefilled on the worker.",
            _WORKER,
        ),
        s(
            "batonserve_num_preemptions_total",
            "counter",
            "Requests the worker preempted (KV blocks reclaimed, recomputed later).",
            _WORKER,
        ),
        s("batonserve_worker_restarts_total", "counter", "Worker actor restarts.", _WORKER),
        # KV handoff between phases, and the mixed pool.
        s(
            "batonserve_kv_handoff_seconds",
            "histogram",
            "Duration of successful KV handoffs.",
            _HANDOFF,
            KV_HANDOFF_BUCKETS,
        ),
        s(
            "batonserve_kv_handoff_bytes_total",
            "counter",
            "KV-cache bytes moved between workers.",
            _HANDOFF,
        ),
        s(
            "batonserve_kv_handoffs_total",
            "counter",
            "KV handoffs attempted (any outcome).",
            _HANDOFF,
        ),
        s(
            "batonserve_kv_handoff_failures_total",
            "counter",
            "KV handoffs that failed, lease expiries included.",
            _HANDOFF,
        ),
        s(
            "batonserve_kv_handoff_lease_expiries_total",
            "counter",
            "KV handoffs aborted because their lease expired unacknowledged.",
            _HANDOFF,
        ),
        # Sequence-parallel (ring) prefill: one observation per member per ring prefill.
        s(
            "batonserve_sp_compute_seconds",
            "histogram",
            "Attention compute time of one ring member in one sequence-parallel prefill.",
            _REQ,
            KV_HANDOFF_BUCKETS,
        ),
        s(
            "batonserve_sp_comm_seconds",
            "histogram",
            "Ring communication time (post to completion) of one member in one SP prefill.",
            _REQ,
            KV_HANDOFF_BUCKETS,
        ),
        s(
            "batonserve_sp_exposed_comm_seconds",
            "histogram",
            "Ring communication time not hidden behind compute, per member and SP prefill.",
            _REQ,
            KV_HANDOFF_BUCKETS,
        ),
        s(
            "batonserve_sp_comm_hidden_ratio",
            "gauge",
            "Share of ring communication hidden behind compute in the latest SP prefill (0-1).",
            _REQ,
        ),
        s(
            "batonserve_sp_prefills_total",
            "counter",
            "Prompts prefilled by a sequence-parallel ring group.",
            _REQ,
        ),
        # MoE experts served from the tiered expert store (workers/expert_store), per worker.
        s(
            "batonserve_moe_expert_cache_hits_total",
            "counter",
            "Expert demands found in a tier of the expert store (gpu, ram; disk = read from disk).",
            _TIER,
        ),
        s(
            "batonserve_moe_expert_cache_misses_total",
            "counter",
            "Expert demands not found in a tier of the expert store (loaded from the next one).",
            _TIER,
        ),
        s(
            "batonserve_moe_expert_loaded_bytes_total",
            "counter",
            "Expert weight bytes copied into a tier (disk: bytes read from the checkpoint).",
            _TIER,
        ),
        s(
            "batonserve_moe_prefetch_issued_total",
            "counter",
            "Experts the predictor's forecasts prefetched into the compute tier.",
            _WORKER,
        ),
        s(
            "batonserve_moe_prefetch_used_total",
            "counter",
            "Prefetched experts demanded before eviction (precision = used / issued).",
            _WORKER,
        ),
        s(
            "batonserve_moe_prefetch_hits_total",
            "counter",
            "First demands served by a prefetched expert (recall = these / (these + misses)).",
            _WORKER,
        ),
        s(
            "batonserve_moe_stall_seconds_total",
            "counter",
            "Time forwards waited for expert weights to load.",
            _WORKER,
        ),
        s(
            "batonserve_moe_tokens_total",
            "counter",
            "Tokens that went through the MoE layers (per-token stall = stall / tokens).",
            _WORKER,
        ),
        s(
            "batonserve_moe_layer_batches_total",
            "counter",
            "MoE layer executions (forwards x MoE layers).",
            _WORKER,
        ),
        s(
            "batonserve_moe_distinct_experts_total",
            "counter",
            "Distinct experts activated, summed over MoE layer executions (per batch: / batches).",
            _WORKER,
        ),
        s(
            "batonserve_moe_regroup_deferred_total",
            "counter",
            "Decode tokens token regrouping held back a step so a batch shares experts.",
            _WORKER,
        ),
        s(
            "batonserve_moe_resident_bytes",
            "gauge",
            "Expert weight bytes resident in the compute tier now.",
            _WORKER,
        ),
        s(
            "batonserve_moe_expert_routed_tokens_total",
            "counter",
            "Token copies routed to each expert of each MoE layer (expert load).",
            _EXPERT,
        ),
        s(
            "batonserve_moe_expert_hits_total",
            "counter",
            "Demands for each expert of each MoE layer found in the compute tier.",
            _EXPERT,
        ),
        s(
            "batonserve_moe_expert_misses_total",
            "counter",
            "Demands for each expert of each MoE layer the compute tier did not hold.",
            _EXPERT,
        ),
        # Expert-parallel auto-tuner (workers/parallel/ep_tuner): its choice per token bucket.
        s(
            "batonserve_moe_ep_overlap_degree",
            "gauge",
            "Overlap degree (chunks pipelined through all-to-all) the EP tuner uses for the bucket.",
            _EP_BUCKET,
        ),
        s(
            "batonserve_moe_ep_capacity_factor",
            "gauge",
            "Capacity factor the EP tuner uses for the bucket (0 = uncapped).",
            _EP_BUCKET,
        ),
        s(
            "batonserve_moe_ep_tuner_switches_total",
            "counter",
            "Times the EP tuner switched the bucket's settings after exploring (probe won).",
            _EP_BUCKET,
        ),
        s(
            "batonserve_moe_ep_forwards_total",
            "counter",
            "Forwards the EP tuner chose expert-parallel settings for.",
            _WORKER,
        ),
        s(
            "batonserve_pool_changes_total",
            "counter",
            "Workers lent to (borrow) or back from (return) the mixed pool.",
            ("pool", "change", "from_role", "to_role"),
        ),
    )


__all__ = [
    "ITL_BUCKETS",
    "KV_HANDOFF_BUCKETS",
    "REQUEST_LATENCY_BUCKETS",
    "TTFT_BUCKETS",
    "SeriesKind",
    "SeriesSpec",
    "build_series",
    "token_buckets",
]

"""Naming lint: every exported series follows Prometheus conventions and carries no request id."""

from __future__ import annotations

import re

from batonserve.cluster.metrics import (
    HandoffRecord,
    Metrics,
    PoolChange,
    RequestFinished,
    RequestRejected,
    WorkerSnapshot,
    build_series,
)
from batonserve.cluster.metrics_ray import RAY_KEY_SERIES
from batonserve.workers.expert_store.types import ExpertStoreStats
from batonserve.workers.parallel.ep_tuner import BucketStats, EPSettings, EPTunerStats

NAME = re.compile(r"^batonserve_[a-z0-9_]+$")
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
# Base units only: seconds and bytes, never milli/micro/kilo prefixes, minutes or percent.
NON_BASE_UNITS = re.compile(
    r"_(ms|us|ns|millis|milliseconds|microseconds|nanoseconds|minutes|hours|days|"
    r"kb|mb|gb|kib|mib|gib|kilobytes|megabytes|gigabytes|bits|percent|perc|pct)(_|$)"
)
# Labels that would make one series per request (unbounded cardinality).
PER_REQUEST = re.compile(r"(^|_)(request|req|id|uuid|trace|span|prompt|user|session)(_|$)")
ALLOWED_LABELS = {
    "model", "code", "finish_reason", "reason", "pool", "worker", "role",
    "from_pool", "to_pool", "change", "from_role", "to_role",
    "tier", "layer", "expert",  # MoE: bounded by the tiers and the model's layers x experts
    "bucket",  # EP tuner: power-of-two token buckets, bounded by log2 of the largest batch
    "finished_reason",  # vLLM's request_success label (stop, length, abort)
    "block_size", "num_gpu_blocks",  # cache_config_info: one value per worker
    "rank",  # tensor parallelism: bounded by the worker's tensor_parallel_size
}  # fmt: skip
# vLLM's v1 names, kept verbatim so its queries carry over, even where they break the house
# conventions above: "perc" for a 0-1 fraction, a histogram ending in _total, a unitless n.
VLLM_VERBATIM = {
    "batonserve_kv_cache_usage_perc",
    "batonserve_iteration_tokens_total",
    "batonserve_request_params_n",
}


def _exercised() -> Metrics:
    """A Metrics with every input called once, so every label set is exported."""
    m = Metrics("demo")
    m.request_admitted()
    m.request_started(0.1)
    m.first_token(0.2)
    m.inter_token(0.05)
    m.request_params(16, 1)
    m.request_finished(RequestFinished("OK", "stop", 3, 2, 1, 0.5, True, 0.1, 0.2, 0.2, 0.4))
    m.request_rejected(RequestRejected("queue_full"))
    m.worker_snapshot(
        WorkerSnapshot(
            "decode-0",
            "decode",
            "decode",
            0.5,
            1,
            0,
            10,
            5,
            block_size=16,
            num_blocks=64,
            rank_param_bytes=(1000, 1000),
        )
    )
    m.iteration_tokens("decode-0", "decode", (1, 40))
    m.worker_restarted("decode", "decode-0")
    m.kv_handoff(HandoffRecord("prefill", "decode", 0.01, 100))
    m.kv_handoff(HandoffRecord("prefill", "decode", 0.01, 100, outcome="lease_expired"))
    m.pool_change(PoolChange("prefill", "borrow", "prefill", "mixed"))
    moe = ExpertStoreStats(2, 4)
    moe.expert_load[1][3] = 5
    moe.expert_hits[1][3], moe.expert_misses[0][2] = 4, 1
    m.moe("decode-0", "decode", moe)
    m.ep_tuner("decode-0", "decode", EPTunerStats(3, {128: BucketStats(EPSettings(2, 1.25))}))
    return m


def test_spec_names_units_and_labels() -> None:
    specs = build_series(8192)
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "duplicate series name"
    for spec in specs:
        assert NAME.match(spec.name), spec.name
        assert ":" not in spec.name  # colons are for recording rules
        if spec.name in VLLM_VERBATIM:
            continue
        assert not NON_BASE_UNITS.search(spec.name), f"{spec.name}: not a base unit"
        if spec.kind == "counter":
            assert spec.name.endswith("_total"), f"{spec.name}: counters end in _total"
        else:
            assert not spec.name.endswith("_total"), f"{spec.name}: only counters end in _total"
        if spec.kind == "histogram":
            assert spec.name.endswith(("_seconds", "_tokens")), f"{spec.name}: unit suffix"
            assert list(spec.buckets) == sorted(spec.buckets) and spec.buckets[0] > 0
        if "usage" in spec.name:
            assert spec.name.endswith("_ratio"), f"{spec.name}: fractions are _ratio (0-1)"
        for label in spec.labels:
            assert LABEL.match(label), f"{spec.name}: label {label!r}"
            assert not PER_REQUEST.search(label), f"{spec.name}: per-request label {label!r}"
            assert label in ALLOWED_LABELS, f"{spec.name}: label {label!r} not in the allowed set"
            assert label != "le" and label != "quantile"


def test_exposition_matches_specs_and_naming() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    m = _exercised()
    specs = {s.name: s for s in m.specs}
    seen = set()
    for fam in text_string_to_metric_families(m.exposition().decode()):
        for sample in fam.samples:
            assert NAME.match(sample.name), sample.name
            base = sample.name
            for suffix in ("_bucket", "_count", "_sum"):
                if fam.type == "histogram" and base.endswith(suffix):
                    base = base[: -len(suffix)]
            spec = specs[base]  # every exported sample belongs to a declared series
            seen.add(base)
            assert set(sample.labels) - {"le"} == set(spec.labels), sample
            for value in sample.labels.values():
                assert value, f"{sample.name}: empty label value"
    assert seen == set(specs), f"series never exported: {set(specs) - seen}"


def test_ray_mirror_series_are_declared() -> None:
    assert set(RAY_KEY_SERIES) <= {s.name for s in build_series(8192)}

"""Mirror of batonserve's series into Ray's own metrics (`ray.util.metrics`), for the Ray dashboard.

`Metrics` feeds every update here as well when it was built inside a Ray driver. Series keep
their `batonserve_*` names and labels (Ray's exporter adds its `ray_` prefix); only the key
series listed in `RAY_KEY_SERIES` are mirrored, to keep Ray's metrics agent light.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batonserve.cluster.metrics import SeriesSpec

RAY_KEY_SERIES = frozenset(
    {
        "batonserve_requests_total",
        "batonserve_requests_in_flight",
        "batonserve_num_requests_waiting",
        "batonserve_num_requests_running",
        "batonserve_rejections_total",
        "batonserve_time_to_first_token_seconds",
        "batonserve_inter_token_latency_seconds",
        "batonserve_e2e_request_latency_seconds",
        "batonserve_prompt_tokens_total",
        "batonserve_generation_tokens_total",
        "batonserve_kv_cache_usage_perc",
        "batonserve_worker_role",
        "batonserve_worker_running_batch_size",
        "batonserve_kv_handoff_seconds",
        "batonserve_kv_handoff_failures_total",
        "batonserve_pool_changes_total",
        "batonserve_worker_restarts_total",
    }
)


def ray_mirror_if_running(specs: Iterable[SeriesSpec]) -> RayMirror | None:
    """A mirror when this process is a Ray driver or worker (ray.is_initialized()), else None."""
    # If ray was never imported it cannot be initialized; this avoids paying ray's import time.
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return RayMirror(specs)


class RayMirror:
    """Ray Counter/Gauge/Histogram objects for the key series, updated with the same values."""

    def __init__(self, specs: Iterable[SeriesSpec]) -> None:
        from ray.util import metrics as ray_metrics

        self._metrics: dict[str, Any] = {}
        for spec in specs:
            if spec.name not in RAY_KEY_SERIES:
                continue
            if spec.kind == "counter":
                obj: Any = ray_metrics.Counter(spec.name, spec.doc, tag_keys=spec.labels)
            elif spec.kind == "gauge":
                obj = ray_metrics.Gauge(spec.name, spec.doc, tag_keys=spec.labels)
            else:
                obj = ray_metrics.Histogram(
                    spec.name, spec.doc, boundaries=list(spec.buckets), tag_keys=spec.labels
                )
            self._metrics[spec.name] = obj

    @property
    def names(self) -> frozenset[str]:
        """The series this mirror records."""
        return frozenset(self._metrics)

    def inc(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """Add `value` (> 0) to a counter."""
        obj = self._metrics.get(name)
        if obj is not None:
            obj.inc(value, tags=dict(labels))

    def set(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """Set a gauge."""
        obj = self._metrics.get(name)
        if obj is not None:
            obj.set(value, tags=dict(labels))

    def observe(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """Record one histogram observation."""
        obj = self._metrics.get(name)
        if obj is not None:
            obj.observe(value, tags=dict(labels))


__all__ = ["RAY_KEY_SERIES", "RayMirror", "ray_mirror_if_running"]

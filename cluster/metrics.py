"""Prometheus metrics: the one place that exports batonserve's series (named in metrics_series).

The router and the cluster report what happened as plain typed data (see `metrics_inputs`);
`Metrics` turns it into `batonserve_*` series on its own `CollectorRegistry`, served at
`/metrics` (127.0.0.1:9400 by default), and mirrors them into Ray's metrics view when it runs
inside a Ray driver. Histogram buckets follow vLLM's so dashboards translate.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from batonserve.cluster.metrics_inputs import (
    HandoffRecord,
    PoolChange,
    RequestFinished,
    RequestRejected,
    WorkerSnapshot,
)
from batonserve.cluster.metrics_ray import RayMirror, ray_mirror_if_running
from batonserve.cluster.metrics_series import (
    ITL_BUCKETS,
    KV_HANDOFF_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    SeriesSpec,
    build_series,
    token_buckets,
)
from batonserve.workers.expert_store.types import ExpertStoreStats
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.sp_serving.report import SPStepReport


@dataclass
class _WorkerState:
    """What the last snapshot of one worker said (for counter deltas and stale label sets)."""

    pool: str
    role: str
    totals: tuple[int, ...]  # the monotonic totals named in _WORKER_TOTALS, in order
    ranks: int = 0  # rank_param_bytes series exported (tensor-parallel ranks)


@dataclass
class _EPTunerState:
    """What the last EP tuner report of one worker said (for deltas and stale bucket gauges)."""

    pool: str
    totals: dict[tuple[str, tuple[str, ...]], float]  # {(series, label values): total}
    buckets: frozenset[str]  # bucket label values whose gauges are exported


class Metrics:
    """All of batonserve's series on one registry; producers call the typed input methods."""

    def __init__(
        self,
        model: str,
        *,
        max_model_len: int = 8192,
        ray_mirror: bool = True,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not model:
            raise ValueError("model: the served model name must be non-empty")
        self.model = model
        # `*_created` samples double every counter's and histogram's series for no dashboard use.
        prometheus_client.disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.specs = build_series(max_model_len)
        self._series: dict[str, Any] = {
            spec.name: _make(spec, self.registry) for spec in self.specs
        }
        self._labels = {spec.name: spec.labels for spec in self.specs}
        self._mirror: RayMirror | None = ray_mirror_if_running(self.specs) if ray_mirror else None
        # Gauges derived from counts we own: set absolutely, so the Ray mirror sees the same value.
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._workers: dict[str, _WorkerState] = {}
        self._cache_info: dict[str, dict[str, str]] = {}  # worker -> its cache_config_info labels
        # Per worker: the last MoE totals seen, {(series, label values): total}, for deltas.
        self._moe_totals: dict[str, dict[tuple[str, tuple[str, ...]], float]] = {}
        # Per worker: the last expert-parallel tuner report (totals for deltas, exported buckets).
        self._ep: dict[str, _EPTunerState] = {}
        self._server: Any = None
        for spec in self.specs:
            if spec.labels == ("model",):
                # Export zeros from the start, so rate() and increase() also see the first events.
                self._series[spec.name].labels(model=model)
        self._publish_request_gauges()

    @property
    def ray_mirrored(self) -> bool:
        """True when the series are also recorded with ray.util.metrics."""
        return self._mirror is not None

    # --- the endpoint ---

    def start_http_server(self, host: str = "127.0.0.1", port: int = 9400) -> int:
        """Serve `/metrics` on host:port in a daemon thread; returns the bound port (0 picks one)."""
        if self._server is not None:
            raise RuntimeError("Metrics.start_http_server: already serving")
        server, _thread = prometheus_client.start_http_server(
            port, addr=host, registry=self.registry
        )
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint, if started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def exposition(self) -> bytes:
        """The text exposition format, as `/metrics` serves it."""
        return prometheus_client.generate_latest(self.registry)

    # --- requests (router) ---

    def request_admitted(self) -> None:
        """A request passed validation and admission; it now waits for a worker."""
        with self._lock:
            self._waiting += 1
            self._publish_request_gauges()

    def request_started(self, queue_seconds: float | None = None) -> None:
        """An admitted request was scheduled on a worker after `queue_seconds` in the queue.

        None: the queue time comes later, with request_finished (once the worker has said).
        """
        if queue_seconds is not None:
            _check_seconds("request_started", queue_seconds)
        with self._lock:
            if self._waiting <= 0:
                raise RuntimeError("Metrics.request_started: no admitted request is waiting")
            self._waiting -= 1
            self._running += 1
            self._publish_request_gauges()
        if queue_seconds is not None:
            self._observe("batonserve_request_queue_time_seconds", self._req, queue_seconds)

    def request_params(self, max_tokens: int, n: int | None = None) -> None:
        """An admitted request's max_tokens, and its n once per client request (vLLM's params)."""
        self._observe("batonserve_request_params_max_tokens", self._req, max_tokens)
        if n is not None:
            self._observe("batonserve_request_params_n", self._req, n)

    def first_token(self, ttft_seconds: float) -> None:
        """The first token of a request was sent, `ttft_seconds` after admission."""
        _check_seconds("first_token", ttft_seconds)
        self._observe("batonserve_time_to_first_token_seconds", self._req, ttft_seconds)

    def inter_token(self, gap_seconds: float, tokens: int = 1) -> None:
        """`tokens` more tokens were sent `gap_seconds` after the previous ones (mean gap each)."""
        _check_seconds("inter_token", gap_seconds)
        if tokens < 1:
            raise ValueError(f"inter_token.tokens: must be >= 1, got {tokens}")
        for _ in range(tokens):
            self._observe("batonserve_inter_token_latency_seconds", self._req, gap_seconds / tokens)

    def request_finished(self, rec: RequestFinished) -> None:
        """An admitted request ended; moves the request gauges, counters and histograms."""
        with self._lock:
            if rec.started:
                if self._running <= 0:
                    raise RuntimeError("Metrics.request_finished: no started request is running")
                self._running -= 1
            else:
                if self._waiting <= 0:
                    raise RuntimeError("Metrics.request_finished: no admitted request is waiting")
                self._waiting -= 1
            self._publish_request_gauges()
        req = self._req
        reason = rec.finish_reason or "none"
        self._inc("batonserve_requests_total", {**req, "code": rec.code, "finish_reason": reason})
        self._observe("batonserve_e2e_request_latency_seconds", req, rec.duration_seconds)
        self._observe("batonserve_request_prompt_tokens", req, rec.prompt_tokens)
        self._observe("batonserve_request_generation_tokens", req, rec.generation_tokens)
        self._inc("batonserve_prompt_tokens_total", req, rec.prompt_tokens)
        self._inc("batonserve_generation_tokens_total", req, rec.generation_tokens)
        self._inc("batonserve_cached_prompt_tokens_total", req, rec.cached_tokens)
        if rec.code == "OK" and rec.finish_reason is not None:
            self._inc("batonserve_request_success_total", {**req, "finished_reason": reason})
        phases = (
            ("batonserve_request_queue_time_seconds", rec.queue_seconds),
            ("batonserve_request_prefill_time_seconds", rec.prefill_seconds),
            ("batonserve_request_decode_time_seconds", rec.decode_seconds),
            ("batonserve_request_inference_time_seconds", rec.inference_seconds),
        )
        for name, value in phases:
            if value is not None:
                self._observe(name, req, value)
        if rec.decode_seconds is not None and rec.generation_tokens > 1:
            tpot = rec.decode_seconds / (rec.generation_tokens - 1)
            self._observe("batonserve_request_time_per_output_token_seconds", req, tpot)

    def request_rejected(self, rej: RequestRejected, *, was_admitted: bool = False) -> None:
        """A request was refused (never call request_finished for it as well).

        `was_admitted`: the router had already reported request_admitted (the refusal came from
        the cluster's admission control after the router's own checks); it leaves the queue.
        """
        if was_admitted:
            with self._lock:
                if self._waiting <= 0:
                    raise RuntimeError("Metrics.request_rejected: no admitted request is waiting")
                self._waiting -= 1
                self._publish_request_gauges()
        self._inc("batonserve_rejections_total", {**self._req, "reason": rej.reason})
        self._inc(
            "batonserve_requests_total", {**self._req, "code": rej.code, "finish_reason": "none"}
        )

    # --- workers and cluster ---

    def worker_snapshot(self, snap: WorkerSnapshot) -> None:
        """A worker's latest step stats; monotonic totals become counter increments."""
        with self._lock:
            old = self._workers.get(snap.worker)
            if old is not None and old.pool != snap.pool:
                self._drop_worker_series(snap.worker, old)
                old = None
            if old is not None and old.role != snap.role:
                self._remove(
                    "batonserve_worker_role", {**_wl(old.pool, snap.worker), "role": old.role}
                )
            totals = (
                snap.prefix_cache_queries,
                snap.prefix_cache_hits,
                snap.preemptions,
                snap.regroup_deferred,
            )
            last = old.totals if old is not None else (0,) * len(totals)
            # A total smaller than the last one means the engine restarted: all of it is new.
            deltas = [t - lt if t >= lt else t for t, lt in zip(totals, last, strict=True)]
            self._workers[snap.worker] = _WorkerState(
                snap.pool, snap.role, totals, len(snap.rank_param_bytes)
            )
        wl = _wl(snap.pool, snap.worker)
        if old is None:
            # Counters start at 0 when the worker appears, so increase() sees its first restart.
            for name in _WORKER_COUNTERS:
                self._series[name].labels(**wl)
        self._set("batonserve_kv_cache_usage_perc", wl, snap.kv_cache_usage)
        self._set("batonserve_worker_role", {**wl, "role": snap.role}, 1)
        self._set("batonserve_worker_running_batch_size", wl, snap.running)
        self._set("batonserve_worker_waiting_requests", wl, snap.waiting)
        self._set("batonserve_worker_pending_prefill_tokens", wl, snap.pending_prefill_tokens)
        if snap.rank_param_bytes:
            self._set("batonserve_worker_tensor_parallel_size", wl, len(snap.rank_param_bytes))
            for rank, nbytes in enumerate(snap.rank_param_bytes):
                self._set("batonserve_worker_rank_param_bytes", {**wl, "rank": str(rank)}, nbytes)
        for name, delta in zip(_WORKER_TOTALS, deltas, strict=True):
            self._inc(name, wl, delta)
        if snap.num_blocks > 0:
            info = {
                **wl,
                "block_size": str(snap.block_size),
                "num_gpu_blocks": str(snap.num_blocks),
            }
            with self._lock:
                stale = self._cache_info.get(snap.worker)
                self._cache_info[snap.worker] = info
            if stale is not None and stale != info:
                self._remove("batonserve_cache_config_info", stale)
            self._set("batonserve_cache_config_info", info, 1)

    def iteration_tokens(self, worker: str, pool: str, tokens: Iterable[int]) -> None:
        """Tokens computed by each of a worker's engine steps (vLLM's iteration_tokens_total)."""
        wl = _wl(pool, worker)
        for n in tokens:
            self._observe("batonserve_iteration_tokens_total", wl, n)

    def worker_removed(self, worker: str) -> None:
        """A worker left for good (scale-down): its gauges stop being exported."""
        with self._lock:
            old = self._workers.pop(worker, None)
            if old is not None:
                self._drop_worker_series(worker, old)
            ep = self._ep.pop(worker, None)
            if ep is not None:
                self._drop_ep_gauges(worker, ep.pool, ep.buckets)

    def worker_restarted(self, pool: str, worker: str) -> None:
        """A worker actor was restarted; its next snapshot's totals count from zero."""
        with self._lock:
            state = self._workers.get(worker)
            if state is not None:
                state.totals = (0,) * len(_WORKER_TOTALS)
            self._moe_totals.pop(worker, None)
            ep = self._ep.get(worker)
            if ep is not None:
                ep.totals = {}  # the new tuner counts from zero; its gauges go on its next report
        self._inc("batonserve_worker_restarts_total", _wl(pool, worker))

    def kv_handoff(self, rec: HandoffRecord) -> None:
        """One KV handoff ended (ok, failed, aborted by lease expiry, or cancelled)."""
        hl = {"from_pool": rec.from_pool, "to_pool": rec.to_pool}
        for name in _HANDOFF_COUNTERS:
            self._series[name].labels(**hl)  # zeros, so failure ratios read 0 instead of nothing
        self._inc("batonserve_kv_handoffs_total", hl)
        self._inc("batonserve_kv_handoff_bytes_total", hl, rec.bytes)
        if rec.outcome == "ok":
            # Failed handoffs stop at an arbitrary point; their duration would skew the latency.
            self._observe("batonserve_kv_handoff_seconds", hl, rec.seconds)
            return
        if rec.outcome == "cancelled":  # the request ended first: nothing failed
            return
        self._inc("batonserve_kv_handoff_failures_total", hl)
        if rec.outcome == "lease_expired":
            self._inc("batonserve_kv_handoff_lease_expiries_total", hl)

    def pool_change(self, change: PoolChange) -> None:
        """A worker was borrowed into, or returned from, the mixed pool."""
        labels = {
            "pool": change.pool,
            "change": change.change,
            "from_role": change.from_role,
            "to_role": change.to_role,
        }
        self._inc("batonserve_pool_changes_total", labels)

    def sequence_parallel(self, report: SPStepReport) -> None:
        """One ring member's figures for one sequence-parallel prefill."""
        for value in (report.compute_s, report.comm_s, report.exposed_comm_s):
            _check_seconds("sequence_parallel", value)
        req = self._req
        self._observe("batonserve_sp_compute_seconds", req, report.compute_s)
        self._observe("batonserve_sp_comm_seconds", req, report.comm_s)
        self._observe("batonserve_sp_exposed_comm_seconds", req, report.exposed_comm_s)
        self._set("batonserve_sp_comm_hidden_ratio", req, report.hidden_fraction)
        if report.rank == 0:  # every member reports; count the prefill once
            self._inc("batonserve_sp_prefills_total", req)

    def moe(self, worker: str, pool: str, stats: ExpertStoreStats) -> None:
        """A worker's expert-store totals (monotonic since it started) become counter increments."""
        for owner, value in (("worker", worker), ("pool", pool)):
            if not value:
                raise ValueError(f"moe.{owner}: must be a non-empty string")
        wl = _wl(pool, worker)
        totals: dict[tuple[str, tuple[str, ...]], float] = {}

        def put(name: str, labels: tuple[str, ...], value: float) -> None:
            totals[(name, labels)] = float(value)

        for tier, ts in sorted(stats.tiers.items()):
            put("batonserve_moe_expert_cache_hits_total", (tier,), ts.hits)
            put("batonserve_moe_expert_cache_misses_total", (tier,), ts.misses)
            put("batonserve_moe_expert_loaded_bytes_total", (tier,), ts.bytes_in)
        put("batonserve_moe_prefetch_issued_total", (), stats.prefetch_issued)
        put("batonserve_moe_prefetch_used_total", (), stats.prefetch_used)
        put("batonserve_moe_prefetch_hits_total", (), stats.demand_hits_from_prefetch)
        put("batonserve_moe_stall_seconds_total", (), stats.stall_seconds)
        put("batonserve_moe_tokens_total", (), stats.tokens)
        put("batonserve_moe_layer_batches_total", (), stats.forwards * stats.num_layers)
        put("batonserve_moe_distinct_experts_total", (), stats.distinct_experts)
        per_expert = (
            ("batonserve_moe_expert_routed_tokens_total", stats.expert_load),
            ("batonserve_moe_expert_hits_total", stats.expert_hits),
            ("batonserve_moe_expert_misses_total", stats.expert_misses),
        )
        for name, table in per_expert:
            for layer, row in enumerate(table):
                for expert, n in enumerate(row):
                    put(name, (str(layer), str(expert)), n)
        for v in totals.values():
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"moe.stats: totals must be finite numbers >= 0, got {v!r}")
        with self._lock:
            state = self._workers.get(worker)
            if state is not None and state.pool != pool:
                self._moe_totals.pop(worker, None)  # a new label set: its counters start over
            last = self._moe_totals.get(worker, {})
            self._moe_totals[worker] = totals
        # Per-expert series appear with their first token (bounded, but layers x experts of zeros).
        self._add_totals(wl, totals, last, quiet=tuple(name for name, _ in per_expert))
        self._set("batonserve_moe_resident_bytes", wl, stats.resident_bytes)

    def ep_tuner(self, worker: str, pool: str, stats: EPTunerStats) -> None:
        """A worker's expert-parallel tuner: its current choice per bucket, and its totals.

        The gauges hold each token bucket's current settings; the counters come from the tuner's
        monotonic totals as deltas. Fewer forwards than last time means the worker restarted:
        all of its totals are new, and buckets it has not seen since stop being exported.
        """
        for owner, value in (("worker", worker), ("pool", pool)):
            if not value:
                raise ValueError(f"ep_tuner.{owner}: must be a non-empty string")
        if not _is_count(stats.forwards):
            raise ValueError(
                f"ep_tuner.stats.forwards: must be an int >= 0, got {stats.forwards!r}"
            )
        forwards = "batonserve_moe_ep_forwards_total"
        switches = "batonserve_moe_ep_tuner_switches_total"
        totals: dict[tuple[str, tuple[str, ...]], float] = {(forwards, ()): float(stats.forwards)}
        gauges: dict[str, tuple[float, float]] = {}
        for b, bs in sorted(stats.buckets.items()):
            where = f"ep_tuner.stats.buckets[{b!r}]"
            if not _is_count(b) or b < 1 or b & (b - 1):
                raise ValueError(f"{where}: buckets must be powers of two >= 1")
            if not _is_count(bs.switches):
                raise ValueError(f"{where}.switches: must be an int >= 0, got {bs.switches!r}")
            overlap, cf = bs.current.overlap, bs.current.capacity_factor
            if not _is_count(overlap) or overlap < 1:
                raise ValueError(f"{where}.current.overlap: must be an int >= 1, got {overlap!r}")
            if not (math.isfinite(cf) and cf >= 0):
                raise ValueError(
                    f"{where}.current.capacity_factor: must be a finite number >= 0, got {cf!r}"
                )
            totals[(switches, (str(b),))] = float(bs.switches)
            gauges[str(b)] = (float(overlap), float(cf))
        with self._lock:
            old = self._ep.get(worker)
            last = old.totals if old is not None and old.pool == pool else {}
            if last and stats.forwards < last.get((forwards, ()), 0.0):
                last = {}  # the tuner started over (a restart nobody reported): all of it is new
            if old is not None:
                # A new pool is a new label set; a restarted tuner has forgotten some buckets.
                stale = set(old.buckets) if old.pool != pool else set(old.buckets) - set(gauges)
                if stale:
                    self._drop_ep_gauges(worker, old.pool, stale)
            self._ep[worker] = _EPTunerState(pool, totals, frozenset(gauges))
        wl = _wl(pool, worker)
        self._add_totals(wl, totals, last)
        for bucket, (overlap_degree, capacity_factor) in gauges.items():
            bl = {**wl, "bucket": bucket}
            self._set("batonserve_moe_ep_overlap_degree", bl, overlap_degree)
            self._set("batonserve_moe_ep_capacity_factor", bl, capacity_factor)

    # --- internals ---

    @property
    def _req(self) -> dict[str, str]:
        return {"model": self.model}

    def _publish_request_gauges(self) -> None:
        req = self._req
        self._set("batonserve_num_requests_waiting", req, self._waiting)
        self._set("batonserve_num_requests_running", req, self._running)
        self._set("batonserve_requests_in_flight", req, self._waiting + self._running)

    def _drop_worker_series(self, worker: str, old: _WorkerState) -> None:
        wl = _wl(old.pool, worker)
        for name in (
            "batonserve_kv_cache_usage_perc",
            "batonserve_worker_running_batch_size",
            "batonserve_worker_waiting_requests",
            "batonserve_worker_pending_prefill_tokens",
            "batonserve_moe_resident_bytes",
            "batonserve_worker_tensor_parallel_size",
        ):
            self._remove(name, wl)
        for rank in range(old.ranks):
            self._remove("batonserve_worker_rank_param_bytes", {**wl, "rank": str(rank)})
        self._remove("batonserve_worker_role", {**wl, "role": old.role})
        info = self._cache_info.pop(worker, None)
        if info is not None:
            self._remove("batonserve_cache_config_info", info)

    def _add_totals(
        self,
        wl: dict[str, str],
        totals: Mapping[tuple[str, tuple[str, ...]], float],
        last: Mapping[tuple[str, tuple[str, ...]], float],
        quiet: tuple[str, ...] = (),
    ) -> None:
        """Counter increments from monotonic totals {(series, extra label values): total}.

        A label set seen for the first time is exported at zero first (unless its series is in
        `quiet`), so rate() and increase() see its first events; a total below the last one
        means the producer restarted, so all of it is new.
        """
        for (name, values), total in totals.items():
            labels = {**wl, **dict(zip(self._labels[name][2:], values, strict=True))}
            prev = last.get((name, values))
            if prev is None:
                if name not in quiet:
                    self._series[name].labels(**labels)
                prev = 0.0
            self._inc(name, labels, total - prev if total >= prev else total)

    def _drop_ep_gauges(self, worker: str, pool: str, buckets: Iterable[str]) -> None:
        for bucket in buckets:
            bl = {**_wl(pool, worker), "bucket": bucket}
            self._remove("batonserve_moe_ep_overlap_degree", bl)
            self._remove("batonserve_moe_ep_capacity_factor", bl)

    def _inc(self, name: str, labels: Mapping[str, str], value: float = 1.0) -> None:
        if value <= 0:
            return  # a zero increment must still not create label sets in the mirror
        self._series[name].labels(**labels).inc(value)
        if self._mirror is not None:
            self._mirror.inc(name, labels, value)

    def _set(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self._series[name].labels(**labels).set(value)
        if self._mirror is not None:
            self._mirror.set(name, labels, value)

    def _observe(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self._series[name].labels(**labels).observe(value)
        if self._mirror is not None:
            self._mirror.observe(name, labels, value)

    def _remove(self, name: str, labels: Mapping[str, str]) -> None:
        # KeyError: never exported under these labels, nothing to drop.
        with contextlib.suppress(KeyError):
            self._series[name].remove(*(labels[k] for k in self._labels[name]))
        if self._mirror is not None:
            self._mirror.set(name, labels, 0.0)  # Ray cannot drop a tag set; zero it instead


# Counters fed from a snapshot's monotonic totals, in _WorkerState.totals order.
_WORKER_TOTALS = (
    "batonserve_prefix_cache_queries_total",
    "batonserve_prefix_cache_hits_total",
    "batonserve_num_preemptions_total",
    "batonserve_moe_regroup_deferred_total",
)
_WORKER_COUNTERS = (*_WORKER_TOTALS, "batonserve_worker_restarts_total")
_HANDOFF_COUNTERS = (
    "batonserve_kv_handoffs_total",
    "batonserve_kv_handoff_bytes_total",
    "batonserve_kv_handoff_failures_total",
    "batonserve_kv_handoff_lease_expiries_total",
)


def _wl(pool: str, worker: str) -> dict[str, str]:
    return {"pool": pool, "worker": worker}


def _is_count(value: object) -> bool:
    """An int >= 0 (bools are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_seconds(method: str, value: float) -> None:
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{method}: seconds must be a finite number >= 0, got {value!r}")


def _make(spec: SeriesSpec, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    """The prometheus_client object for one spec, registered on `registry`."""
    if spec.kind == "counter":
        return Counter(spec.name, spec.doc, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.doc, spec.labels, registry=registry)
    return Histogram(spec.name, spec.doc, spec.labels, registry=registry, buckets=spec.buckets)


__all__ = [
    "ITL_BUCKETS",
    "KV_HANDOFF_BUCKETS",
    "REQUEST_LATENCY_BUCKETS",
    "TTFT_BUCKETS",
    "HandoffRecord",
    "Metrics",
    "PoolChange",
    "RequestFinished",
    "RequestRejected",
    "SeriesSpec",
    "WorkerSnapshot",
    "build_series",
    "token_buckets",
]

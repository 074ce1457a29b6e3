"""ExpertStore: experts served from tiers (disk -> RAM -> GPU) with a pluggable fast-tier policy.

The compute tier (RAM on CPU, GPU memory on CUDA) holds at most `fast_budget_bytes` of experts and
its policy decides evictions. A demand for a resident expert is a hit; otherwise the expert is read
(from the RAM tier on CUDA, else disk) while the forward waits, and that wait is the stall. Prefetch
(forecasts from the predictor) fills the compute tier in the background and never blocks a demand;
with `prefetch_lockstep` (tensor parallelism) prefetches are instead planned at fixed points of the
forward and only their reads run behind (planned_reads.py), so residency is the same on every rank.
Whatever the tiers hold, the weights returned are the checkpoint's, so outputs never change.

On CPU the compute tier's memory is one slab of `fast_budget_bytes // expert_bytes` expert slots
allocated at start (cache.Slab): a miss evicts for a slot first, then reads the expert from disk
straight into it. No expert tensor is ever allocated or freed while serving, so the tier's memory
is the budget, with no allocator fragments beside it (freed 6 MB experts used to stay in glibc's
heap: +70-80 MB on a 153 MB budget after 48 decode steps).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import torch

from batonserve.workers.expert_store.cache import CacheTier, Slab
from batonserve.workers.expert_store.disk import DiskTier
from batonserve.workers.expert_store.planned_reads import PlannedReads
from batonserve.workers.expert_store.policies import PolicyContext, make_policy
from batonserve.workers.expert_store.policies.lru import LRUPolicy
from batonserve.workers.expert_store.prefetch import Prefetcher
from batonserve.workers.expert_store.types import (
    ExpertKey,
    ExpertStoreStats,
    ExpertWeights,
    StoreConfig,
)


class ExpertStore:
    """Tiered expert weights for one model: `experts(layer, ids)` returns their weights."""

    def __init__(self, model_dir: Path, config: StoreConfig, ctx: PolicyContext) -> None:
        self.config = config
        self.ctx = ctx
        self.device = torch.device(config.device)
        self.disk = DiskTier(
            model_dir, config.dtype, config.drop_page_cache, config.disk_reader, config.expert_slice
        )
        self.stats = ExpertStoreStats(ctx.num_layers, ctx.num_experts)
        sample = self.disk.read(ExpertKey(0, 0))  # equal-size experts
        self.expert_bytes = sample.nbytes
        self._shapes = (tuple(sample.w_gate_up.shape), tuple(sample.w_down.shape))
        self.disk.bytes_read = self.disk.reads = 0
        self.policy = make_policy(config.policy, ctx)
        fast_name = "gpu" if self.device.type == "cuda" else "ram"
        # On CPU the compute tier lives in a slab of budget // expert_bytes slots allocated here.
        self._slab: Slab | None = None
        self._slot_of: dict[ExpertKey, int] = {}  # resident expert -> its slab slot
        self._reserved = 0  # slots taken by reads in flight (not yet resident)
        if self.device.type != "cuda":
            self._slab = Slab(
                config.fast_budget_bytes // self.expert_bytes, *self._shapes, sample.w_gate_up.dtype
            )
        del sample
        self.fast = CacheTier(
            config.fast_budget_bytes, self.policy, self.stats.tiers[fast_name], self._free_slot
        )
        self.ram: CacheTier | None = None
        self._uploader = None
        if self.device.type == "cuda":
            from batonserve.workers.expert_store.cuda_tier import CudaUploader

            self._uploader = CudaUploader(self.device)
            if config.ram_budget_bytes:
                self.ram = CacheTier(
                    config.ram_budget_bytes, LRUPolicy(ctx), self.stats.tiers["ram"]
                )
        self._lock = threading.RLock()
        self._inflight: dict[ExpertKey, threading.Event] = {}
        self._now = 0  # demand access counter (the policies' clock)
        self._tick = -1  # layer tick: forward * num_layers + layer
        self._forward = -1
        self._protect: frozenset[ExpertKey] = frozenset()
        self.prefetcher: Prefetcher | None = None
        self.planned: PlannedReads | None = None  # lockstep prefetch: reads planned, not awaited
        self._next_forecast: tuple[int, list[ExpertKey]] | None = None  # lockstep: to plan next
        if config.prefetch and config.prefetch_lockstep:
            self.planned = PlannedReads()
        elif config.prefetch:
            self.prefetcher = Prefetcher(
                self._prefetch_load,
                lambda: self._tick,
                config.prefetch_bandwidth_bytes_per_s,
                self.expert_bytes,
            )

    # -- forward protocol --------------------------------------------------------------------
    def begin_forward(self, num_tokens: int) -> int:
        """A forward of `num_tokens` tokens starts; returns its index."""
        with self._lock:
            self._forward += 1
            self.stats.forwards += 1
            self.stats.tokens += num_tokens
            return self._forward

    def tick_of(self, layer: int, forward: int | None = None) -> int:
        """The layer tick of `layer` in `forward` (default: the current one)."""
        fwd = self._forward if forward is None else forward
        return fwd * self.ctx.num_layers + layer

    def forecast(self, forecasts: Mapping[int, Collection[ExpertKey]]) -> None:
        """Forecasts {layer tick: experts}: tell the policy, and prefetch when enabled."""
        with self._lock:
            for tick, keys in sorted(forecasts.items()):
                self.policy.forecast(tick, keys)
            if self.planned is not None and forecasts:
                # lockstep: the nearest forecast layer is planned after the next demand loads
                tick = min(forecasts)
                self._next_forecast = (tick, sorted(forecasts[tick]))
        if self.prefetcher is None:
            return
        for tick, keys in sorted(forecasts.items()):
            todo = [k for k in sorted(keys) if k not in self.fast and k not in self._inflight]
            if todo:
                self.prefetcher.submit(tick, todo)

    def experts(
        self, layer: int, ids: Sequence[int], tokens_per_expert: Sequence[int]
    ) -> list[ExpertWeights]:
        """Demand: the weights of experts `ids` (ascending) of `layer`, loading misses now."""
        t0 = time.perf_counter()
        keys = [ExpertKey(layer, e) for e in ids]
        with self._lock:
            self._tick = self.tick_of(layer)
            self.policy.advance(self._tick)
            due = self.planned.due(self._tick) if self.planned is not None else []
            # planned reads not collected yet are being written into tier memory: never evicted
            planned = self.planned.keys() if self.planned is not None else frozenset()
            self._protect = frozenset(keys) | planned
            self.stats.distinct_experts += len(keys)
            for key, n in zip(keys, tokens_per_expert, strict=True):
                self.stats.expert_load[layer][key.expert] += int(n)
        self._collect(due)
        out = [self._demand(key) for key in keys]
        self.stats.stall_seconds += time.perf_counter() - t0
        if self._next_forecast is not None:
            self._plan_prefetch()
        return out

    def warm(self, order: Sequence[ExpertKey]) -> tuple[int, int]:
        """Read experts in `order` straight from the checkpoint into the tiers, one at a time: the
        compute tier up to its budget, then the RAM tier up to its; the rest stays on disk.

        Start-up only (before any forward); returns (experts in the compute tier, in RAM). The
        counters start from zero afterwards: warming is not traffic.
        """
        fast = ram = 0
        size = self.expert_bytes
        for key in order:
            fast_room = self.fast.used_bytes + size <= self.fast.budget
            ram_room = self.ram is not None and self.ram.used_bytes + size <= self.ram.budget
            if not fast_room and not ram_room:
                break
            if self._slab is not None and fast_room:
                with self._lock:
                    slot = self._reserve(key, 0, prefetch=False)
                if slot is None:
                    break
                weights = self.disk.read(key, self._slab.weights(slot))
                with self._lock:
                    self._commit(key, weights, slot, 0, prefetch=False)
                fast += 1
                continue
            host = self.disk.read(key)
            if self._uploader is not None:
                host = self._uploader.pin(host)
            if fast_room:
                weights = self._uploader.upload(host, True) if self._uploader is not None else host
                self.fast.insert(key, weights, 0, (), prefetch=False)
                fast += 1
            else:
                assert self.ram is not None
                self.ram.insert(key, host, 0, (), prefetch=False)
                ram += 1
        for tier in self.stats.tiers.values():
            tier.hits = tier.misses = tier.bytes_in = tier.evictions = 0
        self.disk.bytes_read = self.disk.reads = 0
        self._note_resident()
        return fast, ram

    # -- internals ---------------------------------------------------------------------------
    def _demand(self, key: ExpertKey) -> ExpertWeights:
        """One demand access: hit, wait for an in-flight prefetch, or load now."""
        st = self.stats
        with self._lock:
            now = self._now
            self._now += 1
            st.demand_accesses += 1
            entry = self.fast.get(key)
            self.policy.on_access(key, now)
            if entry is not None:
                st.expert_hits[key.layer][key.expert] += 1
                self.fast.stats.hits += 1
                if entry.prefetched and not entry.used:
                    st.prefetch_used += 1
                    st.demand_hits_from_prefetch += 1
                entry.used = True
                return entry.weights
            st.expert_misses[key.layer][key.expert] += 1
            self.fast.stats.misses += 1
            pending = self._inflight.get(key)
        if pending is not None:  # a prefetch is reading it: waiting is never slower than re-reading
            st.late_prefetch += 1
            pending.wait()
            with self._lock:
                entry = self.fast.get(key)
                if entry is not None:
                    if not entry.used:
                        st.prefetch_used += 1
                    entry.used = True
                    return entry.weights
        if self.prefetcher is not None:
            self.prefetcher.demand_begin()
        try:
            if self._slab is not None:
                slotted = self._load_into_slot(key, now, prefetch=False)
                return slotted if slotted is not None else self._disk_read(key)
            weights = self._load(key, blocking=False)
        finally:
            if self.prefetcher is not None:
                self.prefetcher.demand_end()
        with self._lock:
            if self.fast.insert(key, weights, now, self._protect, prefetch=False):
                self.fast.entries[key].used = True
            self._note_resident()
        return weights

    def _load(self, key: ExpertKey, blocking: bool) -> ExpertWeights:
        """Read `key` from the nearest lower tier into compute-tier tensors."""
        host = self._read_host(key)
        if self._uploader is not None:
            return self._uploader.upload(host, blocking)
        return host

    def _read_host(self, key: ExpertKey) -> ExpertWeights:
        """`key`'s weights in host memory: from the RAM tier, else disk (pinned on CUDA, and kept
        in the RAM tier when there is one)."""
        host: ExpertWeights | None = None
        if self.ram is not None:
            with self._lock:
                entry = self.ram.get(key)
                if entry is not None:
                    self.ram.stats.hits += 1
                    self.ram.policy.on_access(key, self._now)
                    host = entry.weights
                else:
                    self.ram.stats.misses += 1
        if host is None:
            host = self.disk.read(key)
            disk = self.stats.tiers["disk"]
            with self._lock:
                disk.hits += 1
                disk.bytes_in += host.nbytes
            if self._uploader is not None:
                host = self._uploader.pin(host)
                if self.ram is not None:
                    with self._lock:
                        self.ram.insert(key, host, self._now, (), prefetch=False)
        return host

    def _plan_prefetch(self) -> None:
        """Lockstep prefetch, right after a layer's demand loads: the forecast experts the policy
        admits become resident now (evictions included) and their reads start in the background;
        the layer they are forecast for waits for them (`_collect`). Every decision is made here,
        in the forward's thread, so it depends on the demand sequence only, never on timing."""
        assert self.planned is not None and self._next_forecast is not None
        tick, keys = self._next_forecast
        self._next_forecast = None
        if tick <= self._tick:  # its layer already ran
            self.stats.prefetch_dropped += len(keys)
            return
        with self._lock:
            now = self._now
            for key in keys:
                if key in self.fast or key in self.planned:
                    continue
                if self._slab is not None:
                    slot = self._reserve(key, now, prefetch=True)
                    if slot is None:
                        self.stats.prefetch_dropped += 1
                        continue
                    weights = self._slab.weights(slot)
                    self._reserved -= 1  # the slot is the tier's from now on
                    self.fast.insert(key, weights, now, self._protect, prefetch=True)
                    self._slot_of[key] = slot
                    self.planned.submit(key, tick, partial(self._disk_read, key, weights))
                else:  # the tensors arrive when collected; room is taken now
                    gu, down = (
                        torch.empty(s, dtype=self.disk.dtype, device="meta") for s in self._shapes
                    )
                    if not self.fast.insert(key, ExpertWeights(gu, down), now, self._protect, True):
                        self.stats.prefetch_dropped += 1
                        continue
                    self.planned.submit(key, tick, partial(self._read_host, key))
                self._protect |= {key}
                self.stats.prefetch_issued += 1
            self._note_resident()

    def _collect(self, due: list[tuple[ExpertKey, Future[ExpertWeights]]]) -> None:
        """Wait for the planned reads of the layer about to run (their experts are resident
        already; without a slab the read tensors replace the placeholders now)."""
        for key, read in due:
            if not read.done():
                self.stats.late_prefetch += 1
            host = read.result()
            if self._slab is not None:
                continue
            weights = self._uploader.upload(host, False) if self._uploader is not None else host
            with self._lock:
                entry = self.fast.get(key)
                assert entry is not None  # planned entries are protected until collected
                entry.weights = weights

    def _prefetch_load(self, key: ExpertKey, tick: int) -> None:
        """Prefetcher callback: load `key` unless resident, in flight or refused by the policy."""
        with self._lock:
            if key in self.fast or key in self._inflight:
                return
            if not self.fast.would_admit(key, self.expert_bytes, self._now, self._protect, True):
                self.stats.prefetch_dropped += 1
                return
            done = threading.Event()
            self._inflight[key] = done
        try:
            if self._slab is not None:
                self._load_into_slot(key, self._now, prefetch=True)
                return
            weights = self._load(key, blocking=True)
            with self._lock:
                if self.fast.insert(key, weights, self._now, self._protect, prefetch=True):
                    self.stats.prefetch_issued += 1
                else:
                    self.stats.prefetch_dropped += 1
                self._note_resident()
        finally:
            with self._lock:
                del self._inflight[key]
            done.set()

    def _load_into_slot(self, key: ExpertKey, now: int, prefetch: bool) -> ExpertWeights | None:
        """CPU: evict for a slab slot, read `key` from disk into it, make it resident; None (and
        nothing read) when the policy refuses room: a demand then reads it into new tensors and
        serves it once, not kept, as the tier's insert would have refused it."""
        assert self._slab is not None
        with self._lock:
            slot = self._reserve(key, now, prefetch)
            if slot is None:
                if prefetch:
                    self.stats.prefetch_dropped += 1
                return None
        try:
            weights = self._disk_read(key, self._slab.weights(slot))
        except BaseException:
            with self._lock:
                self._reserved -= 1
                self._slab.free.append(slot)
            raise
        with self._lock:
            weights = self._commit(key, weights, slot, now, prefetch)
            entry = self.fast.get(key)
            if prefetch:
                self.stats.prefetch_issued += 1
            elif entry is not None:
                entry.used = True
            self._note_resident()
        return weights

    def _disk_read(self, key: ExpertKey, out: ExpertWeights | None = None) -> ExpertWeights:
        """A disk-tier read, counted."""
        weights = self.disk.read(key, out)
        disk = self.stats.tiers["disk"]
        with self._lock:
            disk.hits += 1
            disk.bytes_in += weights.nbytes
        return weights

    def _reserve(self, key: ExpertKey, now: int, prefetch: bool) -> int | None:
        """Under the lock: a free slab slot for `key`, evicting what the policy picks (never the
        experts of the layer being computed); None when the policy refuses."""
        assert self._slab is not None
        if not self._slab.free:
            # reserved slots are not in used_bytes: make room for them too, so a slot comes free
            need = self.expert_bytes * (1 + self._reserved)
            victims = self.fast.plan_room(need, now, self._protect)
            if victims is None or not all(
                self.policy.admit(key, v, now, prefetch) for v in victims
            ):
                return None
            for victim in victims:
                self.fast.evict(victim)
            if not self._slab.free:
                return None
        self._reserved += 1
        return self._slab.free.pop()

    def _commit(
        self, key: ExpertKey, weights: ExpertWeights, slot: int, now: int, prefetch: bool
    ) -> ExpertWeights:
        """Under the lock: the expert read into `slot` becomes resident (its slot is now the
        tier's). If another read made it resident meanwhile, that copy wins and `slot` is freed."""
        assert self._slab is not None
        self._reserved -= 1
        resident = self.fast.get(key)
        if resident is None and self.fast.insert(key, weights, now, self._protect, prefetch):
            self._slot_of[key] = slot
            return weights
        self._slab.free.append(slot)
        if resident is not None:
            return resident.weights
        # unreachable with a reserved slot (room exists); a copy keeps the slot free to reuse
        return ExpertWeights(weights.w_gate_up.clone(), weights.w_down.clone())

    def _free_slot(self, key: ExpertKey) -> None:
        """The fast tier evicted `key`: its slot is free (no-op for tiers without a slab)."""
        slot = self._slot_of.pop(key, None)
        if slot is not None and self._slab is not None:
            self._slab.free.append(slot)

    def _note_resident(self) -> None:
        """Track resident and peak bytes of the compute tier."""
        self.stats.resident_bytes = self.fast.used_bytes
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.fast.used_bytes)

    def snapshot_stats(self) -> ExpertStoreStats:
        """A consistent copy of the stats (safe to hand to another thread or the metrics module)."""
        with self._lock:
            return copy.deepcopy(self.stats)

    def drain(self) -> None:
        """Wait for queued prefetches (end of a measured run)."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
        if self.planned is not None:
            self.planned.drain()

    def close(self) -> None:
        """Stop the prefetch worker and close the checkpoint files."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.planned is not None:
            self.planned.close()
        self.disk.close()

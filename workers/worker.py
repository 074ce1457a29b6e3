"""The worker actor body: one engine, a role, a step loop thread, outputs by long-poll.

Plain Python (the controller wraps it with `ray.remote`), so tests drive it in-process too. All
engine calls happen on the step-loop thread; actor methods queue commands for it, so the engine
needs no locks. The role only says which work the cluster sends here: changing it reloads nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from batonserve.workers.config import EngineConfig, Role
from batonserve.workers.engine_core import EngineCore, Runner
from batonserve.workers.engine_protocol import WorkerEngine
from batonserve.workers.handoff_io import KVExporter, KVImporter
from batonserve.workers.kv_transfer import ChannelAddress, KVChunk, KVSpec, make_transport
from batonserve.workers.kv_transfer.base import split_peer
from batonserve.workers.outputs import CoreOutput, aborted_output
from batonserve.workers.request import RequestStatus
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import StepPlan
from batonserve.workers.scripted_engine import ScriptedEngine
from batonserve.workers.sp_serving.member import RingMember
from batonserve.workers.sp_serving.types import RingJob, RingSetup
from batonserve.workers.step_clock import MAX_STEP_RECORDS, StepClock
from batonserve.workers.tp.kv_lanes import KVLanes
from batonserve.workers.worker_types import (
    HandoffEvent,
    HandoffSpec,
    PollResult,
    WorkerSpec,
    WorkerStats,
)

ABORTED_MEMORY = 65536  # aborted request ids remembered, to refuse late submits
BACKSTOP_LEASES = 2.0  # a worker frees an unfinished handoff itself after this many leases
PREFIX_REFRESH_S = 0.25  # how stale the cached-prefix report to the cluster may be


def _node_ip() -> str:
    """This node's address for KV channels (127.0.0.1 in local clusters)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def rank_param_bytes(engine: object) -> tuple[int, ...]:
    """Each rank's resident parameter bytes (one entry without TP; none for a scripted engine)."""
    runner: Any = getattr(engine, "runner", None)
    per_rank = getattr(runner, "rank_bytes", None)  # a tensor-parallel runner (workers/tp/)
    if per_rank is not None:
        return tuple(per_rank)
    return (runner.parameter_bytes(),) if hasattr(runner, "parameter_bytes") else ()


def build_engine(spec: WorkerSpec) -> WorkerEngine:
    """The scripted fake, or the real engine core (leading an EP group if the spec says so)."""
    if spec.scripted is not None:
        return ScriptedEngine(spec.scripted, name=spec.model)
    from batonserve.workers.engine import build_core

    if spec.engine.expert_parallel_size > 1:
        from batonserve.workers.parallel.ep_serving import build_ep_runner

        def factory(model_dir: Path, config: EngineConfig) -> Runner:
            return build_ep_runner(model_dir, config, spec.name, spec.namespace)

        return build_core(spec.model, spec.engine, factory, model_name=spec.model)
    if spec.tensor_parallel_size > 1:
        from batonserve.workers.tp.serving import build_tp_runner

        def tp_factory(model_dir: Path, config: EngineConfig) -> Runner:
            size = spec.tensor_parallel_size
            return build_tp_runner(model_dir, config, size, spec.name, spec.namespace)

        return build_core(spec.model, spec.engine, tp_factory, model_name=spec.model)
    return build_core(spec.model, spec.engine, model_name=spec.model)


class Worker:
    """One serving worker: an engine plus its role, its KV transport and its outbox."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.role: Role = spec.role
        self.engine = build_engine(spec)
        self.clock = StepClock(self.engine.scheduler)
        self.kv_spec = self.engine.kv_spec
        device = self.engine.device
        self.transport = make_transport(
            spec.kv.transport,
            spec.name,
            self.kv_spec,
            spec.kv,
            self._on_chunk,
            self._on_transport_error,
            host=_node_ip(),
            namespace=spec.namespace,
            device=str(device),
        )
        runner: Any = getattr(self.engine, "runner", None)
        if hasattr(runner, "start_kv"):  # a TP group: each follower rank has its own transport
            runner.start_kv(spec.name, self.kv_spec, spec.kv, _node_ip(), spec.namespace)
        self.lanes = KVLanes(self.engine, self.transport, self.kv_spec)
        self.exporter = KVExporter(self.engine, self.transport, self.kv_spec, self.lanes)
        self.importer = KVImporter(self.engine, self.kv_spec, device, self.lanes)
        self.ring: RingMember | None = None  # set when the controller makes this a ring member
        # Ring jobs sent here and not yet run (queued behind other jobs): reported as handoffs
        # in progress, so the cluster renews their leases while the ring works through the queue.
        self._ring_waiting: dict[int, RingJob] = {}
        self._cv = threading.Condition()
        self._aborted: dict[str, None] = {}  # insertion-ordered set of recently aborted ids
        self._cmds: list[Callable[[], None]] = []
        self._deltas: list[CoreOutput] = []  # outputs not yet polled, in step order
        self._step_tokens: list[int] = []
        self._events: list[HandoffEvent] = []
        self._steps = 0
        self._hashes: tuple[int, ...] = ()
        self._hashes_at = 0.0
        self._prefix_epoch = 0
        self._error = ""
        self._stopped = False
        # Handoffs the owning cluster said were live at its latest poll, and when: the backstop
        # leaves those to it, so a long prefill queue is not mistaken for a dead owner.
        self._vouched: frozenset[int] = frozenset()
        self._vouched_at = 0.0
        self._stats = self._make_stats()
        self._thread = threading.Thread(target=self._loop, name=f"step-{spec.name}", daemon=True)
        self._thread.start()

    # ---- control plane (actor methods) ----------------------------------------------------

    def ready(self) -> WorkerStats:
        """Stats once the engine is built (the controller awaits this after creating the actor)."""
        return self._stats

    def kv_spec_info(self) -> KVSpec:
        """The KVSpec that must match a peer's for handoff."""
        return self.kv_spec

    def set_role(self, role: Role) -> None:
        """Switch role (mixed pool); weights and in-flight requests stay."""
        self.role = role
        self._enqueue(lambda: None)  # refresh stats

    def submit(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        """Prefill and decode a request here (in place)."""

        def run() -> None:
            if request_id not in self._aborted:
                with self._refusal(request_id, len(prompt)):
                    self.engine.add_request(request_id, prompt, params)
                    self.clock.added(request_id)

        self._enqueue(run)

    def submit_prefill(self, handoff: HandoffSpec) -> None:
        """Prefill only, streaming the KV to handoff.dst layer by layer; pin it until release."""

        def run() -> None:
            if handoff.request_id in self._aborted:
                return
            with self._refusal(handoff.request_id, handoff.prompt_len):
                self.exporter.start(handoff)
                self.engine.add_request(
                    handoff.request_id,
                    list(handoff.prompt_token_ids),
                    handoff.params,
                    prefill_only=True,
                )
                self.clock.added(handoff.request_id)

        self._enqueue(run)

    def ring_join(self, setup: RingSetup) -> str:
        """Join the ring group (collective with the other members); "" or the error text."""
        done = threading.Event()
        error: list[str] = []

        def run() -> None:
            try:
                if self.ring is None:
                    if not isinstance(self.engine, EngineCore):
                        raise ValueError("sequence_parallel: ring prefill needs a model engine")
                    self.ring = RingMember(self.engine, self.transport)
                self.ring.join(setup)
            except Exception as e:
                error.append(f"{type(e).__name__}: {e}")
            finally:
                done.set()

        self._enqueue(run)
        if not done.wait(setup.timeout_s + 30.0):
            return "ring join did not finish in time"
        return error[0] if error else ""

    def submit_ring(self, job: RingJob) -> None:
        """Prefill this member's shard of a ring job (in job order) and hand its KV rows over."""

        def run() -> None:
            ring = self.ring
            deltas, events = ring.offer(job, lambda r: r in self._aborted) if ring else ([], [])
            with self._cv:
                waiting = self._ring_waiting.items()
                self._ring_waiting = {h: j for h, j in waiting if ring and ring.queued(j)}
                self._steps += 1  # progress: the cluster renews the leases still waiting
                self._deltas.extend(deltas)
                self._events.extend(events)
                self._stats = self._make_stats()
                self._cv.notify_all()

        with self._cv:
            self._ring_waiting[job.handoff.handoff_id] = job
        self._enqueue(run)

    def begin_import(self, handoff: HandoffSpec) -> None:
        """Expect a handoff's KV (called before the prefill side starts sending)."""
        self.lanes.begin(handoff.handoff_id, handoff.prompt_len)  # TP followers stage theirs
        with self._cv:
            if handoff.request_id in self._aborted:
                self.lanes.drop(handoff.handoff_id)
                return
            self.importer.begin(handoff)
        self._enqueue(lambda: None)  # refresh stats

    def release(self, request_id: str) -> None:
        """The decode side acknowledged: free the prefilled request's blocks."""

        def run() -> None:
            self.exporter.drop(request_id)
            if self.ring is not None:
                self.ring.free(request_id)
            if request_id in self._pinned():
                self.engine.release(request_id)
            else:  # acknowledged before it pinned (or a stray ack): its copy is not needed here
                self.engine.abort_request(request_id)

        self._enqueue(run)

    def abort(self, request_id: str) -> None:
        """End a request here wherever it is and free its KV; idempotent."""
        with self._cv:
            # Calls to a threaded actor may run out of order: a submit that arrives after its
            # abort must not start (request ids are unique per attempt).
            if request_id not in self._aborted:
                self._aborted[request_id] = None
                while len(self._aborted) > ABORTED_MEMORY:
                    self._aborted.pop(next(iter(self._aborted)))
            self.importer.drop_request(request_id)

        def run() -> None:
            self.exporter.drop(request_id)
            self.importer.drop_request(request_id)
            if self.ring is not None:
                self.ring.free(request_id)
            self.engine.abort_request(request_id)

        self._enqueue(run)

    def poll(self, timeout_s: float = 1.0, live_handoffs: tuple[int, ...] = ()) -> PollResult:
        """Long-poll: every delta and event since the last call (waits up to timeout_s for one).

        `live_handoffs`: the handoffs involving this worker that the cluster still owns.
        """
        with self._cv:
            self._vouched, self._vouched_at = frozenset(live_handoffs), time.monotonic()
            if not self._deltas and not self._events and not self._stopped:
                self._cv.wait(timeout_s)
            deltas, self._deltas = self._deltas, []
            events, self._events = self._events, []
            steps, self._step_tokens = self._step_tokens, []
            return PollResult(tuple(deltas), tuple(events), self._stats, tuple(steps))

    def stats(self) -> WorkerStats:
        """Latest stats."""
        return self._stats

    def health(self) -> bool:
        """True while the step loop runs without error."""
        return self._thread.is_alive() and not self._error

    def shutdown(self) -> None:
        """Stop the loop and the transport (and a TP group's follower ranks)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self.transport.close()
        self.lanes.close()

    # ---- KV channels -------------------------------------------------------------------------

    def kv_listen(self, peer: str) -> ChannelAddress | None:
        """Sender side of a new channel to `peer`."""
        return self.transport.listen(peer)

    def kv_connect(self, peer: str, addr: ChannelAddress, sender: bool) -> None:
        """Join a channel: every lane between this group's ranks and the peer's (both sides
        call this concurrently)."""
        self.lanes.connect(peer, addr, sender)

    def kv_close_peer(self, peer: str) -> None:
        """Drop channels with a dead or replaced peer (every rank's)."""
        self.lanes.close_peer(peer)

    def kv_push(self, peer: str, meta: KVChunk, kv: torch.Tensor | None) -> None:
        """Object-store transport: a chunk whose tensor Ray already fetched."""
        self.transport.push(peer, dataclasses.replace(meta, kv=kv))

    def kv_push_lane(self, rank: int, peer: str, meta: KVChunk, refs: list[Any]) -> None:
        """Object-store transport: a chunk for follower `rank`; its reference is passed on
        unresolved, so the tensor goes from the sending rank's node straight to that rank's."""
        self.lanes.followers[rank - 1].kv_push.remote(peer, meta, refs[0])

    def kv_tp_size(self) -> int:
        """This worker's tensor-parallel size (a sender's routes depend on it)."""
        return self.lanes.size

    def kv_rank_done(self, handoff_id: int, rank: int) -> None:
        """Follower `rank` staged its whole share of an import."""
        if self.importer.rank_done(handoff_id, rank):
            self._enqueue(lambda: self._commit(handoff_id))

    def kv_rank_error(self, peer: str, detail: str) -> None:
        """A follower's lane with worker `peer` failed: every handoff with it has failed."""
        self._on_transport_error(peer, RuntimeError(detail))

    # ---- step loop ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _refusal(self, request_id: str, prompt_len: int) -> Iterator[None]:
        """An engine that refuses one request (ValueError) ends that request, not the worker."""
        try:
            yield
        except ValueError as e:
            self.exporter.drop(request_id)
            delta = aborted_output(request_id, prompt_len, str(e))
            with self._cv:
                self._deltas.append(delta)
                self._cv.notify_all()

    def _enqueue(self, fn: Callable[[], None]) -> None:
        with self._cv:
            self._cmds.append(fn)
            self._cv.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._cmds and not self._stopped and not self._busy():
                    self._cv.wait(PREFIX_REFRESH_S)  # idle: still refresh the stats now and then
                if self._stopped:
                    return
                cmds, self._cmds = self._cmds, []
            try:
                for fn in cmds:
                    fn()
                outputs: list[CoreOutput] = []
                stepped = self.engine.has_unfinished()
                if stepped:
                    outputs = self.engine.step(self._on_layer)
                    self._steps += 1
                    self._events_out(self.importer.drain())  # the step may have freed blocks
                self._backstop()
                self._check_ranks()
                self._publish(outputs, wake=stepped)
                for rid in self.exporter.take_failed():  # after the step: not mid-forward
                    self.engine.abort_request(rid)
            except Exception:
                self._error = traceback.format_exc()
                self._stats = self._make_stats()
                with self._cv:
                    self._cv.notify_all()
                return

    def _check_ranks(self) -> None:
        """A TP or EP worker whose follower rank died goes down now, even when idle, so the
        controller replaces the whole group (the error ends this loop)."""
        check = getattr(getattr(self.engine, "runner", None), "check_followers", None)
        if check is not None:
            check()

    def _backstop(self) -> None:
        """Free handoffs whose owner never ended them (BACKSTOP_LEASES leases later)."""
        limit = BACKSTOP_LEASES * self.spec.kv.lease_s
        with self._cv:
            fresh = time.monotonic() - self._vouched_at < limit
            vouched = self._vouched if fresh else frozenset()
        # Stale exports end their engine requests through take_failed; a staged import has none.
        events = self.exporter.stale(limit, vouched) + self.importer.stale(limit, vouched)
        if self.ring is not None:
            self.ring.stale(limit)
        if events:
            with self._cv:
                self._events.extend(events)

    def _busy(self) -> bool:
        return self.engine.has_unfinished()

    def _on_layer(self, layer: int, plan: StepPlan) -> None:
        failed = self.exporter.on_layer(layer, plan)
        if failed:
            with self._cv:
                self._events.extend(failed)

    def _publish(self, outputs: list[CoreOutput], wake: bool) -> None:
        deltas: list[CoreOutput] = []
        events: list[HandoffEvent] = []
        self.clock.stepped(o.request_id for o in outputs)
        for o in outputs:
            ev = self.exporter.on_output(o)
            if ev is not None:
                events.append(ev)
            deltas.append(dataclasses.replace(o, queue_s=self.clock.take_queue_s(o.request_id)))
        stats = self._make_stats()
        steps = self.clock.take_step_tokens()
        with self._cv:
            self._deltas.extend(deltas)
            self._step_tokens.extend(steps)
            del self._step_tokens[:-MAX_STEP_RECORDS]  # nobody polled for a while: keep the last
            self._events.extend(events)
            self._stats = stats
            if wake or deltas or events:  # a step's fresh load figures matter to the CLS too
                self._cv.notify_all()

    def _on_chunk(self, peer: str, chunk: KVChunk) -> None:
        if self.importer.on_chunk(chunk):
            hid = chunk.handoff_id
            self._enqueue(lambda: self._commit(hid))

    def _commit(self, handoff_id: int) -> None:
        self._events_out(self.importer.commit(handoff_id))

    def _events_out(self, events: list[HandoffEvent]) -> None:
        if events:
            with self._cv:
                self._events.extend(events)

    def _on_transport_error(self, peer: str, err: Exception) -> None:
        peer = split_peer(peer)[0]  # a lane of a TP peer: the peer worker

        def run() -> None:
            events = self.exporter.fail_peer(peer, str(err)) + self.importer.fail_peer(
                peer, str(err)
            )
            with self._cv:
                self._events.extend(events)

        self._enqueue(run)

    def _pinned(self) -> set[str]:
        reqs = self.engine.scheduler.requests
        return {r for r, q in reqs.items() if q.status is RequestStatus.PREFILLED}

    def _cached_hashes(self) -> tuple[int, ...]:
        """The pool's cached prefix hashes, recomputed at most every PREFIX_REFRESH_S."""
        now = time.monotonic()
        if now - self._hashes_at >= PREFIX_REFRESH_S:
            pool = self.engine.pool
            hashes = (pool.block_hash(b) for b in range(pool.num_blocks))
            self._hashes = tuple(h for h in hashes if h is not None)
            self._hashes_at = now
            self._prefix_epoch += 1
        return self._hashes

    def _make_stats(self) -> WorkerStats:
        s = self.engine.stats()
        pool = self.engine.pool
        hashes = self._cached_hashes()
        return WorkerStats(
            name=self.spec.name,
            pool=self.spec.pool,
            role=self.role,
            healthy=not self._error,
            running=s.num_running,
            waiting=s.num_waiting,
            pinned=s.num_pinned,
            pending_prefill_tokens=s.pending_prefill_tokens,
            # Blocks promised to staged imports are not free to the CLS (reserved at pairing).
            num_free_blocks=max(0, pool.num_free_blocks - self.importer.reserved_blocks()),
            num_blocks=pool.num_blocks,
            block_size=pool.block_size,
            kv_usage=s.kv_usage,
            prefix_queries=s.prefix_queries,
            prefix_hits=s.prefix_hits,
            steps=self._steps,
            handoffs_in_progress=(
                *self.exporter.in_progress(),
                *self.importer.in_progress(),
                *self._ring_in_progress(),
            ),
            exports=len(self.exporter.exports) + (len(self.ring.held) if self.ring else 0),
            imports=len(self.importer),
            error=self._error[-2000:],
            preemptions=s.num_preemptions,
            tensor_parallel_size=self.spec.tensor_parallel_size,
            rank_param_bytes=rank_param_bytes(self.engine),
            regroup_deferred=s.regroup_deferred,
            cached_block_hashes=hashes,
            prefix_epoch=self._prefix_epoch,
            sp_reports=tuple(self.ring.reports) if self.ring else (),
            moe=s.moe,
            ep_tuner=self.engine.ep_tuner_stats(),
        )

    def _ring_in_progress(self) -> tuple[int, ...]:
        with self._cv:
            return tuple(self._ring_waiting)

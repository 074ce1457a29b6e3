"""The live cluster behind the router: Ray workers, CLS pairing, layer-wise handoffs, recovery.

`start_cluster` starts (or joins) Ray and the worker pools; `Cluster` implements `ClusterAPI`.
Everything here runs on the router's event loop: one long-poll task per worker brings back
token deltas and handoff events, a housekeeping task ends expired leases and runs the mixed
pool. Detokenization and stop strings happen here, in the router process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray

from batonserve.cluster.api import (
    AdmissionRejected,
    ClusterUnavailable,
    GenerateRequest,
    ModelInfo,
    ServerInfo,
    TokenDelta,
)
from batonserve.cluster.config import ServeConfig
from batonserve.cluster.controller import Controller, WorkerHandle
from batonserve.cluster.env import keep_ray_on_loopback
from batonserve.cluster.handoff import Handoff, HandoffLedger
from batonserve.cluster.metrics_inputs import HandoffOutcome
from batonserve.cluster.observer import ClusterObserver, NullObserver, handoff_record
from batonserve.cluster.placement import StartupError, check_pools_fit, local_num_cpus
from batonserve.cluster.reconcile import Reconciler
from batonserve.cluster.request_state import Attempt, RequestState
from batonserve.cluster.request_table import RequestTable
from batonserve.cluster.ring import RingChoice, RingRoutes
from batonserve.cluster.scheduling import (
    ClusterScheduler,
    Pairing,
    PrefixIndex,
    Rejection,
    RejectReason,
    RequestView,
    WorkerView,
    assume_assigned,
)
from batonserve.cluster.worker_events import WorkerEvents, quiet
from batonserve.cluster.worker_monitor import WorkerMonitor
from batonserve.cluster.worker_stats import worker_info, worker_view
from batonserve.workers.block_pool import hash_blocks
from batonserve.workers.output_processor import OutputProcessor
from batonserve.workers.scripted_engine import ScriptedEngineConfig
from batonserve.workers.worker_types import HandoffEvent, HandoffSpec

log = logging.getLogger("batonserve.cluster")

MAX_ATTEMPTS = 8
RETRY_S = 20.0  # a request no worker can resume waits this long (longer while one is replaced)


class Cluster:
    """ClusterAPI over Ray worker pools (see module docstring).

    Composed of parts that own their state: the request table, the handoff ledger, the worker
    monitor (poll loops -> typed events), the reactions to those events, the ring routes and
    the reconciler; the cluster itself pairs requests and starts, restarts and ends attempts.
    """

    def __init__(
        self,
        config: ServeConfig,
        controller: Controller,
        model_info: ModelInfo,
        processor: OutputProcessor,
        observer: ClusterObserver,
        started_ray: bool,
    ) -> None:
        self.config = config
        self.controller = controller
        self._model_info = model_info
        self.processor = processor
        self.observer = observer
        self.started_ray = started_ray
        self.kv = config.kv_transfer
        self.ledger = HandoffLedger(self.kv.lease_s)
        self.prefix_index = PrefixIndex()
        self.cls = ClusterScheduler(config.scheduler, prefix_lookup=self.prefix_index)
        self.requests = RequestTable()
        self._views: dict[str, WorkerView] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.ring_routes = RingRoutes(controller)
        self.events = WorkerEvents(self)
        self.monitor = WorkerMonitor(
            controller, self.events.on_worker_event, self._live_handoffs, self.spawn
        )
        self.reconciler = Reconciler(self, config.ray.drain_timeout_s)

    def start_background(self) -> None:
        """Start one poller per worker, the housekeeping loop and the reconciler."""
        for h in self.controller.workers.values():
            self.monitor.watch(h.name, h.incarnation)
        self.spawn(self.events.housekeeping())
        self.spawn(self.reconciler.run())

    def _live_handoffs(self, worker: str) -> tuple[int, ...]:
        return tuple(ho.handoff_id for ho in self.ledger.involving(worker))

    def _on_event(self, name: str, ev: HandoffEvent) -> None:
        """A worker's handoff event (one seam: the chaos harness hooks moments here)."""
        self.events.on_event(name, ev)

    # ---- ClusterAPI ---------------------------------------------------------------------------

    def attach_metrics(self, observer: ClusterObserver) -> None:
        """Send worker stats, handoffs, pool changes and restarts to `observer` from now on."""
        self.observer = observer

    def model_info(self) -> ModelInfo:
        """The served model."""
        return self._model_info

    def server_info(self) -> ServerInfo:
        """Pools and workers with their current roles and loads."""
        workers = [
            worker_info(h.name, h.spec.pool, h.role, h.healthy, h.stats)
            for h in self.controller.workers.values()
        ]
        return ServerInfo(tuple(p.name for p in self.config.pools), tuple(workers))

    def ready(self) -> bool:
        """True when every non-empty pool has a healthy worker."""
        if self._closing:
            return False
        for pool in self.config.pools:
            hs = [h for h in self.controller.workers.values() if h.spec.pool == pool.name]
            if hs and not any(h.healthy for h in hs):
                return False
        return any(h.healthy for h in self.controller.workers.values())

    def set_replicas(self, pool: str, n: int) -> None:
        """Desired size of `pool` from now on (drains or adds workers; see cluster/reconcile.py)."""
        self.controller.set_replicas(pool, n)

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Pair now (raising AdmissionRejected / ClusterUnavailable at once), then stream."""
        if self._closing:
            raise ClusterUnavailable("the cluster is shutting down")
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in flight")
        st = RequestState(request)
        pairing = self._pair(st)
        if isinstance(pairing, Rejection):
            if pairing.reason is RejectReason.NO_HEALTHY_WORKER:
                raise ClusterUnavailable(pairing.message)
            raise AdmissionRejected(
                f"{pairing.reason.value}: {pairing.message}", pairing.reason.value
            )
        # Before registering: a stop string without a tokenizer is the caller's error.
        self.processor.add_request(request.request_id, request.prompt_token_ids, request.sampling)
        self.requests.add(st)
        self._start_attempt(st, pairing)
        return self._stream(st)

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV everywhere; idempotent."""
        st = self.requests.get(request_id)
        if st is None:
            return
        self._finish(st)
        if not st.done:
            st.done = True
            st.queue.put_nowait(TokenDelta((), "", "abort", st.usage()))

    async def shutdown(self) -> None:
        """Stop pollers and actors, and Ray if this process started it."""
        self._closing = True
        self.monitor.closing = True
        for st in self.requests.values():
            st.fail(ClusterUnavailable("the cluster is shutting down"))
            self._finish(st)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.controller.shutdown()
        if self.started_ray:
            ray.shutdown()

    # ---- streams -------------------------------------------------------------------------------

    async def _stream(self, st: RequestState) -> AsyncIterator[TokenDelta]:
        try:
            while True:
                item = await st.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            rid = st.request_id
            if self.requests.get(rid) is st:
                await self.abort(rid)  # the client went away

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run a background task that the cluster cancels at shutdown."""
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- pairing and attempts ------------------------------------------------------------------

    def _view(self, h: WorkerHandle) -> WorkerView:
        return worker_view(
            h.name,
            h.spec.pool,
            h.home_role,
            h.role,
            h.stats,
            healthy=h.healthy,
            draining=h.draining,
        )

    def views(self) -> list[WorkerView]:
        """Worker snapshots, adjusted for pairings made since each worker's last poll."""
        out = []
        for h in self.controller.workers.values():
            v = self._views.get(h.name) or self._view(h)
            if v.healthy != h.healthy or v.role != h.role or v.draining != h.draining:
                v = self._view(h)
            out.append(v)
        return out

    def _pair(self, st: RequestState) -> Pairing | Rejection:
        prompt = st.resume_prompt
        views = self.views()
        block_size = views[0].block_size if views else 16
        hashes = (
            tuple(hash_blocks(prompt, block_size))
            if self.config.scheduler.conditional_disaggregation
            else ()
        )
        rv = RequestView(st.request_id, len(prompt), st.resume_params.max_tokens, hashes)
        decision = self.cls.schedule(rv, views)
        if isinstance(decision, Pairing):
            for v in assume_assigned(views, rv, decision):
                self._views[v.worker_id] = v
        return decision

    def _start_attempt(self, st: RequestState, pairing: Pairing) -> None:
        # A long prompt goes to the ring group (its leader is the attempt's prefill worker).
        ring = self.ring_routes.choose(len(st.resume_prompt), pairing.decode_worker)
        prefill = ring.leader if ring is not None else pairing.prefill_worker
        a = st.next_attempt(prefill, pairing.decode_worker)
        self.requests.bind(st, a)
        if ring is not None:
            self.spawn(self._launch_ring(st, a, ring))
        else:
            self.spawn(self._launch(st, a))

    async def _launch(self, st: RequestState, a: Attempt) -> None:
        # The attempt this task was spawned for, not whatever `st.attempt` is when it runs: a
        # second restart in the same loop turn (two workers gone at once) replaces the attempt
        # before this task starts, and launching the newer one here too would submit one
        # worker-level id twice (the worker refuses the second: "already in use").
        if st.attempt is not a or st.done:
            return
        number = a.number
        prompt, params = st.resume_prompt, st.resume_params
        # The actors paired now. If one dies while this launch awaits, its replacement takes
        # the same name; a late call must fail on the dead actor, not start an abandoned
        # attempt on the replacement (aborts skip a worker still starting, so nothing would
        # free it there).
        prefill = self.controller.workers[a.prefill].actor
        decode = self.controller.workers[a.decode].actor
        try:
            if a.prefill != a.decode:
                spec = await self.open_handoff(st, a, (a.prefill,))
                if spec is None:
                    return
                await decode.begin_import.remote(spec)
                if st.attempt is not a:
                    return  # abandoned meanwhile: its abort reached the decode side
                await prefill.submit_prefill.remote(spec)
            else:
                a.phase = "decode"
                await decode.submit.remote(a.worker_request_id, prompt, params)
        except Exception as e:
            log.warning("attempt %s of %s failed to start: %s", number, st.request_id, e)
            if st.attempt is a:
                self.restart(st, f"launch failed: {e}")

    async def _launch_ring(self, st: RequestState, a: Attempt, choice: RingChoice) -> None:
        """Start a ring attempt: channels from every member, import on the decode side, jobs."""
        ring = self.controller.ring
        assert ring is not None
        try:
            spec = await self.open_handoff(st, a, choice.members)
            if spec is None:
                return
            self.ring_routes.attempts[a.worker_request_id] = choice
            await self.controller.workers[a.decode].actor.begin_import.remote(spec)
            if st.attempt is not a or st.done or ring.available() < choice.size:
                raise RuntimeError("the ring group changed before the job was sent")
            ring.submit(choice, spec)
        except Exception as e:
            log.warning("ring attempt %s of %s failed to start: %s", a.number, st.request_id, e)
            if st.attempt is a:
                self.restart(st, f"ring launch failed: {e}")

    async def open_handoff(
        self, st: RequestState, a: Attempt, senders: tuple[str, ...]
    ) -> HandoffSpec | None:
        """Check KV compatibility, connect every sender to the decode worker, open the handoff.

        None when the attempt was abandoned meanwhile (nothing opened).
        """
        workers = self.controller.workers
        d = workers[a.decode]
        for name in senders:
            p = workers[name]
            if p.kv_spec is not None and d.kv_spec is not None:
                p.kv_spec.check_compatible(d.kv_spec)
        await asyncio.gather(*(self.controller.ensure_channel(n, a.decode) for n in senders))
        if st.attempt is not a or st.done:
            return None
        h = self.ledger.open(a.worker_request_id, a.prefill, a.decode)
        a.handoff_id = h.handoff_id
        prompt, params = st.resume_prompt, st.resume_params
        return HandoffSpec(
            h.handoff_id, a.worker_request_id, a.prefill, a.decode, tuple(prompt), params
        )

    def restart(self, st: RequestState, reason: str) -> None:
        """Abandon the current attempt and resume from prompt + tokens already sent."""
        if st.done or self._closing:
            return
        ring = self.controller.ring
        if st.attempt is not None and ring is not None and self.ring_routes.failed(st.attempt):
            self.spawn(ring.build())
        self._drop_attempt(st, "failed")
        if st.attempts >= MAX_ATTEMPTS:
            st.fail(ClusterUnavailable(f"request failed after {st.attempts} attempts: {reason}"))
            self._finish(st)
            return
        log.info("resuming %s after %d tokens: %s", st.request_id, len(st.produced), reason)
        decision = self._pair(st)
        if isinstance(decision, Rejection):
            # Let a replacement come up before giving up on the request.
            self.spawn(self._retry_later(st, decision.message))
            return
        self._start_attempt(st, decision)

    async def _retry_later(self, st: RequestState, why: str) -> None:
        # Wait RETRY_S, and longer while a dead worker is being replaced (up to the worker start
        # timeout): a pool left with no healthy worker is back when its replacement is ready,
        # which on a loaded machine or with a big model takes longer than RETRY_S.
        start = time.monotonic()
        while True:
            await asyncio.sleep(0.2)
            if st.done or self._closing:
                return
            decision = self._pair(st)
            if isinstance(decision, Pairing):
                self._start_attempt(st, decision)
                return
            waited = time.monotonic() - start
            hs = self.controller.workers.values()
            replacing = any(not h.healthy and not h.draining for h in hs)
            if waited >= RETRY_S and not (
                replacing and waited < self.config.ray.worker_start_timeout_s
            ):
                break
        st.fail(ClusterUnavailable(f"no worker can resume the request: {why}"))
        self._finish(st)

    def _drop_attempt(self, st: RequestState, outcome: HandoffOutcome) -> None:
        """Abort the current attempt on its workers and its handoff (all idempotent); an open
        handoff is recorded with `outcome`."""
        a = st.attempt
        if a is None:
            return
        st.attempt = None
        self.requests.unbind(a)
        if a.handoff_id is not None:
            h = self.ledger.abort(a.handoff_id, "request moved")
            if h is not None:
                self.observer.kv_handoff(handoff_record(self.controller, h, outcome))
        for name in {a.prefill, a.decode}:
            self.abort_on(name, a.worker_request_id)

    def abort_on(self, worker: str, worker_request_id: str) -> None:
        """Fire-and-forget abort on a worker (a dead one is simply skipped)."""
        for name in self.ring_routes.targets(worker, worker_request_id):
            h = self.controller.workers.get(name)
            if h is not None and h.healthy and h.actor is not None:
                self.spawn(quiet(h.actor.abort.remote(worker_request_id)))

    def _finish(self, st: RequestState) -> None:
        """Forget a request that ended (its workers are told to drop it)."""
        self._drop_attempt(st, "cancelled")
        if self.requests.get(st.request_id) is st:
            self.requests.remove(st)
            self.processor.remove(st.request_id)

    def abort_handoff(self, h: Handoff, outcome: HandoffOutcome) -> None:
        """A handoff ended unacknowledged: free both sides and resume its request."""
        self.observer.kv_handoff(handoff_record(self.controller, h, outcome))
        self.abort_on(h.src, h.request_id)
        self.abort_on(h.dst, h.request_id)
        found = self.requests.current(h.request_id)
        if found is not None and found[1].handoff_id == h.handoff_id:
            st, a = found
            a.handoff_id = None
            self.restart(st, f"handoff {h.handoff_id} {outcome}: {h.reason}")


async def start_cluster(
    config: ServeConfig,
    progress: Callable[[str], None],
    *,
    scripted: ScriptedEngineConfig | None = None,
    observer: ClusterObserver | None = None,
) -> Cluster:
    """Start (or join) Ray, start every pool, and return the running cluster.

    `scripted` swaps the model for the fake engine with scripted tokens (tests); `observer`
    receives worker snapshots, handoff records and pool changes (the router's Metrics).
    """
    from batonserve.cluster.model_meta import (
        check_model_expert_parallel,
        check_model_tensor_parallel,
        load_model_meta,
    )

    model_info, processor = load_model_meta(config, scripted)
    if scripted is None and config.engine.expert_parallel_size > 1:
        check_model_expert_parallel(config)  # refused here, before any worker starts
    if scripted is None and any(p.tensor_parallel_size > 1 for p in config.pools):
        check_model_tensor_parallel(config)
    started = False
    if not ray.is_initialized():
        keep_ray_on_loopback()
        if config.ray.address:
            progress(f"joining Ray at {config.ray.address}")
            ray.init(
                address=config.ray.address,
                namespace=config.ray.namespace,
                logging_level=logging.WARNING,
            )
        else:
            cpus = config.ray.num_cpus or local_num_cpus(config.pools, len(os.sched_getaffinity(0)))
            progress(f"starting a local Ray instance on 127.0.0.1 ({cpus} CPUs)")
            ray.init(
                address="local",  # a new instance, never whatever cluster happens to run here
                num_cpus=cpus,
                namespace=config.ray.namespace,
                include_dashboard=config.ray.include_dashboard,
                dashboard_host="127.0.0.1",
                dashboard_port=config.ray.dashboard_port,
                logging_level=logging.WARNING,
                _node_ip_address="127.0.0.1",
            )
        started = True
    try:
        if not config.ray.wait_for_resources:  # say at once what cannot fit, never wait on it
            check_pools_fit(config.pools, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    except StartupError:
        if started:
            ray.shutdown()
        raise
    controller = Controller(config, config.model, config.kv_transfer, scripted, progress)
    try:
        await controller.start()
    except BaseException:
        await controller.shutdown()
        if started:
            ray.shutdown()
        raise
    cluster = Cluster(
        config, controller, model_info, processor, observer or NullObserver(), started
    )
    cluster.start_background()
    progress(f"cluster up: {len(controller.workers)} worker(s)")
    return cluster

"""The cluster's reactions to what its workers say: outputs, handoff events, stats, deaths
(replace the actor, resume its requests) and housekeeping (leases, mixed pool).

`WorkerEvents` is one part of `Cluster` (cluster/runtime.py): the `WorkerMonitor` polls and
hands it typed events; it owns what it needs to remember about workers between polls and acts
on requests through the cluster's request table and attempt calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from batonserve.cluster.metrics_inputs import PoolChange
from batonserve.cluster.observer import handoff_record
from batonserve.cluster.worker_monitor import WorkerEvent, WorkerPolled
from batonserve.cluster.worker_stats import worker_snapshot
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.worker_types import HandoffEvent, PollResult

if TYPE_CHECKING:
    from batonserve.cluster.runtime import Cluster

log = logging.getLogger("batonserve.cluster")

HOUSEKEEPING_S = 0.1
SNAPSHOT_S = 0.5  # at most this often per worker to the observer


class WorkerEvents:
    """The cluster's reactions to its workers (see module docstring)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._last_snapshot: dict[str, float] = {}  # worker -> when the observer last got one
        self._prefix_epochs: dict[str, int] = {}  # worker -> prefix report last indexed

    def on_worker_event(self, ev: WorkerEvent) -> None:
        """What the monitor saw: a poll's results, or a worker gone."""
        if isinstance(ev, WorkerPolled):
            self.on_poll(ev.worker, ev.result)
        else:
            self.worker_died(ev.worker, ev.incarnation, ev.why)

    def on_poll(self, name: str, r: PollResult) -> None:
        """Stats first (leases, views, prefix index), then handoff events, then outputs."""
        c = self.cluster
        h = c.controller.workers[name]
        if h.stats is None or r.stats.steps != h.stats.steps:  # it stepped: progress, not a hang
            c.ledger.renew(r.stats.handoffs_in_progress)
        h.stats = r.stats
        c._views.pop(name, None)  # fresh stats replace the optimistic adjustments
        if self._prefix_epochs.get(name) != r.stats.prefix_epoch:
            self._prefix_epochs[name] = r.stats.prefix_epoch
            c.prefix_index.replace(name, r.stats.cached_block_hashes)
        for ev in r.events:  # events first: a commit releases before the decode tokens land
            c._on_event(name, ev)  # through the cluster: the chaos harness hooks it there
        for d in r.deltas:
            self.on_output(name, d)
        if r.step_tokens:
            c.observer.iteration_tokens(name, r.stats.pool, r.step_tokens)
        for report in c.ring_routes.fresh_reports(name, r.stats):
            try:
                c.observer.sequence_parallel(report)
            except ValueError as e:  # a malformed report must not stop the poll loop
                log.warning("dropped an SP report of %s: %s", name, e)
        now = time.monotonic()
        if now - self._last_snapshot.get(name, 0.0) >= SNAPSHOT_S:
            self._last_snapshot[name] = now
            s = r.stats
            c.observer.worker_snapshot(worker_snapshot(s, h.role))
            if s.moe is not None:
                c.observer.moe(s.name, s.pool, s.moe)
            if s.ep_tuner is not None:
                c.observer.ep_tuner(s.name, s.pool, s.ep_tuner)

    def on_output(self, name: str, d: CoreOutput) -> None:
        """A worker's output for an attempt: stream its tokens (in order), or resume on refusal."""
        c = self.cluster
        found = c.requests.current(d.request_id)
        if found is None:
            return  # an abandoned attempt: never taken
        st, a = found
        if name not in (a.prefill, a.decode):
            return
        if name == a.prefill:
            if d.queue_s >= 0:
                st.scheduled(a, d.queue_s)
            if st.cached_tokens < 0:
                st.cached_tokens = d.num_cached_tokens
        if d.prefilled and a.handoff_id is not None:
            c.ledger.prefilled(a.handoff_id)
        if d.error:
            # The router and the CLS already checked the request against every limit, so a
            # worker's refusal is an inconsistency of this attempt: retry on a fresh attempt id
            # (bounded by MAX_ATTEMPTS, after which the request fails as unavailable).
            log.warning("%s refused %s: %s; retrying", name, d.request_id, d.error)
            c.restart(st, f"{name} refused it: {d.error}")
            return
        if d.finished and d.finish_reason == "abort":
            c.restart(st, f"{name} aborted the request")
            return
        if not d.new_token_ids and not d.finished:
            return
        batch = [d]
        if a.disaggregated and name == a.prefill:
            # The first token's one way back: stream it, then the decode outputs it held up.
            a.first_token_in = True
            batch, a.held = [d, *a.held], []
        elif a.disaggregated and not a.first_token_in:
            a.held.append(d)  # the decode side overtook the prefill side's output: keep order
            return
        for x in batch:
            if st.emit(c.processor, x):
                c._finish(st)  # also frees a handoff that the first token made useless
                return

    def on_event(self, name: str, ev: HandoffEvent) -> None:
        """A handoff committed (free the prefill side) or failed (abort it, resume)."""
        c = self.cluster
        h = c.ledger.get(ev.handoff_id)
        if ev.kind == "committed":
            if c.ledger.committed(ev.handoff_id, ev.nbytes):
                assert h is not None
                found = c.requests.current(ev.request_id)
                if found is not None:
                    found[1].phase = "decode"  # its first token still comes from the prefill side
                self.release_on(h.src, ev.request_id)
                c.ledger.released(ev.handoff_id)
                c.observer.kv_handoff(handoff_record(c.controller, h, "ok"))
            else:
                c.abort_on(name, ev.request_id)  # a stale import: drop the decode copy
            return
        aborted = c.ledger.abort(ev.handoff_id, ev.detail or "failed")
        if aborted is not None:
            c.controller.forget_channels_between(aborted.src, aborted.dst)
            c.abort_handoff(aborted, "failed")

    def release_on(self, worker: str, worker_request_id: str) -> None:
        """Tell the prefill side (every ring member) its blocks are no longer needed."""
        c = self.cluster
        for name in c.ring_routes.targets(worker, worker_request_id):
            h = c.controller.workers.get(name)
            if h is not None and h.healthy:
                c.spawn(quiet(h.actor.release.remote(worker_request_id)))

    def worker_died(self, name: str, incarnation: int, why: str) -> None:
        """Resume everything that depended on `name`, then replace it."""
        c = self.cluster
        h = c.controller.workers.get(name)
        if h is None or h.incarnation != incarnation or not h.healthy or c._closing:
            return  # already handled, or removed by a drain
        log.warning(
            "worker %s is gone (%s); %s", name, why, "draining" if h.draining else "replacing it"
        )
        h.healthy = False
        self.forget_worker(name)
        for ho in c.ledger.involving(name):
            aborted = c.ledger.abort(ho.handoff_id, f"{name} died")
            if aborted is not None:
                c.abort_handoff(aborted, "failed")
        for st in c.requests.values():
            if st.attempt is not None and st.attempt.uses(name):
                c.restart(st, f"{name} died")
        if not h.draining:  # a draining worker is not replaced: its drain now ends at once
            c.spawn(self._replace(name))

    def forget_worker(self, name: str) -> None:
        """Drop what the cluster knows of `name` (dead or removed); peers close its KV channels."""
        c = self.cluster
        c._views.pop(name, None)
        c.prefix_index.drop_worker(name)
        self._prefix_epochs.pop(name, None)
        c.controller.forget_channels(name)
        for other in c.controller.workers.values():
            if other.name != name and other.healthy:
                c.spawn(quiet(other.actor.kv_close_peer.remote(name)))

    async def _replace(self, name: str) -> None:
        c = self.cluster
        delay = 0.5
        while not c._closing:
            old = c.controller.workers.get(name)
            if old is None or old.draining:
                return  # a scale-down took it meanwhile (see cluster/reconcile.py)
            try:
                h = await c.controller.replace(name)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("replacing %s failed: %s; retrying in %.1fs", name, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if h.draining or c.controller.workers.get(name) is not h:
                return
            c.observer.worker_restarted(h.spec.pool, name)
            c.monitor.watch(name, h.incarnation)
            return

    async def housekeeping(self) -> None:
        """Forever, every HOUSEKEEPING_S: end expired leases, apply mixed-pool role changes."""
        c = self.cluster
        while not c._closing:
            await asyncio.sleep(HOUSEKEEPING_S)
            self.end_expired_leases()
            self._rebalance()

    def end_expired_leases(self) -> None:
        """Abort every unacknowledged handoff whose lease is over and resume its request."""
        c = self.cluster
        for h in c.ledger.expired():
            log.warning("handoff %s of %s: lease expired", h.handoff_id, h.request_id)
            c.abort_handoff(h, "lease_expired")

    def _rebalance(self) -> None:
        """Apply the mixed pool's role changes (the role is a label: nothing reloads)."""
        c = self.cluster
        for ch in c.cls.rebalance(c.views(), time.monotonic()):
            w = c.controller.workers.get(ch.worker_id)
            if w is None or not w.healthy:
                continue
            # The cluster routes by its own copy of the role at once; the actor's copy (for its
            # stats) follows without blocking the lease clock on a slow or dead actor.
            w.role = ch.to_role
            c.spawn(quiet(w.actor.set_role.remote(ch.to_role)))
            c._views.pop(ch.worker_id, None)
            c.observer.pool_change(PoolChange(w.spec.pool, ch.kind, ch.from_role, ch.to_role))


async def quiet(ref: Any) -> None:
    """Await a fire-and-forget actor call, ignoring its failure (a dead actor is handled by its
    poller, not by whoever sent it a message)."""
    with contextlib.suppress(Exception):
        await ref

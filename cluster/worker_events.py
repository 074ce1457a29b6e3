"""The cluster's reactions to its workers: long-poll loops, token deltas, handoff events,
worker deaths (replace the actor, resume its requests) and housekeeping (leases, mixed pool)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from batonserve.cluster.metrics_inputs import PoolChange
from batonserve.cluster.observer import handoff_record
from batonserve.cluster.reconcile import Reconciler
from batonserve.cluster.worker_stats import worker_snapshot
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.worker_types import HandoffEvent, PollResult

if TYPE_CHECKING:
    from batonserve.cluster.runtime import Cluster

log = logging.getLogger("batonserve.cluster")

POLL_S = 0.5
HOUSEKEEPING_S = 0.1
SNAPSHOT_S = 0.5  # at most this often per worker to the observer


class WorkerEvents:
    """Mixin of Cluster: everything that happens because a worker said (or stopped saying) so."""

    def start_background(self: Cluster) -> None:
        """Start one poller per worker and the housekeeping loop."""
        self._last_snapshot: dict[str, float] = {}
        for h in self.controller.workers.values():
            self.spawn(self._poll_loop(h.name, h.incarnation))
        self.spawn(self._housekeeping())
        self.reconciler = Reconciler(self, self.config.ray.drain_timeout_s)
        self.spawn(self.reconciler.run())

    async def _poll_loop(self: Cluster, name: str, incarnation: int) -> None:
        h = self.controller.workers.get(name)
        if h is None:
            return  # removed (drained) before its poller started
        while not self._closing and h.incarnation == incarnation:
            try:
                owned = tuple(ho.handoff_id for ho in self.ledger.involving(name))
                result: PollResult = await h.actor.poll.remote(POLL_S, owned)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.worker_died(name, incarnation, f"poll failed: {type(e).__name__}")
                return
            if h.incarnation != incarnation:
                return  # replaced or removed (drained) meanwhile
            self._on_poll(name, result)
            if not result.stats.healthy:
                self.worker_died(name, incarnation, f"engine error: {result.stats.error[-300:]}")
                return

    def _on_poll(self: Cluster, name: str, r: PollResult) -> None:
        h = self.controller.workers[name]
        if h.stats is None or r.stats.steps != h.stats.steps:  # it stepped: progress, not a hang
            self.ledger.renew(r.stats.handoffs_in_progress)
        h.stats = r.stats
        self._views.pop(name, None)  # fresh stats replace the optimistic adjustments
        if self._prefix_epochs.get(name) != r.stats.prefix_epoch:
            self._prefix_epochs[name] = r.stats.prefix_epoch
            self.prefix_index.replace(name, r.stats.cached_block_hashes)
        for ev in r.events:  # events first: a commit releases before the decode tokens land
            self._on_event(name, ev)
        for d in r.deltas:
            self._on_delta(name, d)
        if r.step_tokens:
            self.observer.iteration_tokens(name, r.stats.pool, r.step_tokens)
        self.ring_reports(name, r.stats)
        now = time.monotonic()
        if now - self._last_snapshot.get(name, 0.0) >= SNAPSHOT_S:
            self._last_snapshot[name] = now
            s = r.stats
            self.observer.worker_snapshot(worker_snapshot(s, h.role))
            if s.moe is not None:
                self.observer.moe(s.name, s.pool, s.moe)
            if s.ep_tuner is not None:
                self.observer.ep_tuner(s.name, s.pool, s.ep_tuner)

    def _on_delta(self: Cluster, name: str, d: CoreOutput) -> None:
        st = self.by_worker_rid.get(d.request_id)
        a = st.attempt if st is not None else None
        if st is None or a is None or a.worker_request_id != d.request_id:
            return  # an abandoned attempt: never taken
        if name not in (a.prefill, a.decode):
            return
        if name == a.prefill:
            if d.queue_s >= 0:
                st.scheduled(a, d.queue_s)
            if st.cached_tokens < 0:
                st.cached_tokens = d.num_cached_tokens
        if d.prefilled and a.handoff_id is not None:
            self.ledger.prefilled(a.handoff_id)
        if d.error:
            # The router and the CLS already checked the request against every limit, so a
            # worker's refusal is an inconsistency of this attempt: retry on a fresh attempt id
            # (bounded by MAX_ATTEMPTS, after which the request fails as unavailable).
            log.warning("%s refused %s: %s; retrying", name, d.request_id, d.error)
            self.restart(st, f"{name} refused it: {d.error}")
            return
        if d.finished and d.finish_reason == "abort":
            self.restart(st, f"{name} aborted the request")
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
            if st.emit(self.processor, x):
                self._finish(st)  # also frees a handoff that the first token made useless
                return

    def _on_event(self: Cluster, name: str, ev: HandoffEvent) -> None:
        h = self.ledger.get(ev.handoff_id)
        if ev.kind == "committed":
            if self.ledger.committed(ev.handoff_id, ev.nbytes):
                assert h is not None
                st = self.by_worker_rid.get(ev.request_id)
                a = st.attempt if st is not None else None
                if st is not None and a is not None and a.worker_request_id == ev.request_id:
                    a.phase = "decode"  # its first token still comes from the prefill side
                self.abort_on_release(h.src, ev.request_id)
                self.ledger.released(ev.handoff_id)
                self.observer.kv_handoff(handoff_record(self.controller, h, "ok"))
            else:
                self.abort_on(name, ev.request_id)  # a stale import: drop the decode copy
            return
        aborted = self.ledger.abort(ev.handoff_id, ev.detail or "failed")
        if aborted is not None:
            self.controller.forget_channels_between(aborted.src, aborted.dst)
            self.abort_handoff(aborted, "failed")

    def abort_on_release(self: Cluster, worker: str, worker_request_id: str) -> None:
        """Tell the prefill side its blocks are no longer needed."""
        for name in self.ring_targets(worker, worker_request_id):
            h = self.controller.workers.get(name)
            if h is not None and h.healthy:
                self.spawn(self._quiet(h.actor.release.remote(worker_request_id)))

    def worker_died(self: Cluster, name: str, incarnation: int, why: str) -> None:
        """Resume everything that depended on `name`, then replace it."""
        h = self.controller.workers.get(name)
        if h is None or h.incarnation != incarnation or not h.healthy or self._closing:
            return  # already handled, or removed by a drain
        log.warning(
            "worker %s is gone (%s); %s", name, why, "draining" if h.draining else "replacing it"
        )
        h.healthy = False
        self.forget_worker(name)
        for ho in self.ledger.involving(name):
            aborted = self.ledger.abort(ho.handoff_id, f"{name} died")
            if aborted is not None:
                self.abort_handoff(aborted, "failed")
        for st in list(self.requests.values()):
            if st.attempt is not None and st.attempt.uses(name):
                self.restart(st, f"{name} died")
        if not h.draining:  # a draining worker is not replaced: its drain now ends at once
            self.spawn(self._replace(name))

    def forget_worker(self: Cluster, name: str) -> None:
        """Drop what the cluster knows of `name` (dead or removed); peers close its KV channels."""
        self._views.pop(name, None)
        self.prefix_index.drop_worker(name)
        self._prefix_epochs.pop(name, None)
        self.controller.forget_channels(name)
        for other in self.controller.workers.values():
            if other.name != name and other.healthy:
                self.spawn(self._quiet(other.actor.kv_close_peer.remote(name)))

    async def _replace(self: Cluster, name: str) -> None:
        delay = 0.5
        while not self._closing:
            old = self.controller.workers.get(name)
            if old is None or old.draining:
                return  # a scale-down took it meanwhile (see cluster/reconcile.py)
            try:
                h = await self.controller.replace(name)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("replacing %s failed: %s; retrying in %.1fs", name, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if h.draining or self.controller.workers.get(name) is not h:
                return
            self.observer.worker_restarted(h.spec.pool, name)
            self.spawn(self._poll_loop(name, h.incarnation))
            return

    async def _housekeeping(self: Cluster) -> None:
        while not self._closing:
            await asyncio.sleep(HOUSEKEEPING_S)
            for h in self.ledger.expired():
                log.warning("handoff %s of %s: lease expired", h.handoff_id, h.request_id)
                self.abort_handoff(h, "lease_expired")
            self._rebalance()

    def _rebalance(self: Cluster) -> None:
        """Apply the mixed pool's role changes (the role is a label: nothing reloads)."""
        changes = self.cls.rebalance(self.views(), time.monotonic())
        for c in changes:
            w = self.controller.workers.get(c.worker_id)
            if w is None or not w.healthy:
                continue
            # The cluster routes by its own copy of the role at once; the actor's copy (for its
            # stats) follows without blocking the lease clock on a slow or dead actor.
            w.role = c.to_role
            self.spawn(self._quiet(w.actor.set_role.remote(c.to_role)))
            self._views.pop(c.worker_id, None)
            self.observer.pool_change(PoolChange(w.spec.pool, c.kind, c.from_role, c.to_role))

    @staticmethod
    async def _quiet(ref: Any) -> None:
        with contextlib.suppress(Exception):
            await ref

"""The reconcile loop: keeps every pool at its desired size while the cluster serves.

Every RECONCILE_S (and at once when `Controller.set_replicas` changes a size) it compares each
pool's desired replicas with its workers:
- too few: start new workers. One that fits no node stays *pending* (Ray holds it until a node
  with room joins, e.g. KubeRay scaling a worker group up), logged with Ray's reason every
  controller.PROGRESS_S; once ready it gets a poller and takes pairings (KV channels are built on first
  use, so it pairs with every existing worker).
- too many: cancel pending workers first, then *drain* the least loaded ones (never a pool's
  last, never a ring-group member): a draining worker takes no new pairing and no role change,
  its running requests finish and its handoffs close; then its actor is removed and every peer
  closes its KV channels to it. A drain longer than `drain_timeout_s` says so and moves what is
  left through the resume path (prompt + tokens already sent: no token lost).
A worker that dies is not this loop's business: worker_events replaces it (same name), and the
replacement waits for capacity like a pending worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from batonserve.cluster.controller import WorkerHandle

if TYPE_CHECKING:
    from batonserve.cluster.runtime import Cluster

log = logging.getLogger("batonserve.reconcile")

RECONCILE_S = 2.0
DRAIN_LOG_S = 5.0
DRAIN_POLL_S = 0.05
RETRY_S = 5.0  # after a new worker failed to start, before the next try for its pool


def load(h: WorkerHandle) -> tuple[int, float]:
    """How much a worker is doing (requests, then KV in use): the least loaded drains first."""
    s = h.stats
    if s is None:
        return (0, 0.0)
    return (s.running + s.waiting + (1 if s.pending_prefill_tokens else 0), s.kv_usage)


def index(h: WorkerHandle) -> int:
    """The number in `<pool>-<n>` (names sort by it: decode-10 is newer than decode-9)."""
    return int(h.name.rpartition("-")[2])


class Reconciler:
    """Runs on the cluster's event loop; owns the start tasks and drains it begins."""

    def __init__(self, cluster: Cluster, drain_timeout_s: float) -> None:
        self.cluster = cluster
        self.controller = cluster.controller
        self.drain_timeout_s = drain_timeout_s
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = getattr(cluster, "_loop", None)
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.drains: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, float] = {}
        self._stuck_said: set[tuple[str, int]] = set()
        self.controller.changed = self.poke

    def poke(self) -> None:
        """Reconcile now; safe from any thread (set_replicas may come from an actor's thread)."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if self._loop is None or here is self._loop:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Reconcile every RECONCILE_S and whenever poked, until the cluster closes."""
        while not self.cluster._closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECONCILE_S)
            self._wake.clear()
            try:
                self.step()
            except Exception:  # one bad pass must not end reconciling
                log.exception("reconcile pass failed")

    def settled(self) -> bool:
        """Every pool at its desired size, nothing pending or draining."""
        return (
            not self.starting
            and not self.drains
            and all(len(self._members(p)) == n for p, n in self.controller.desired.items())
        )

    # ---- one pass ------------------------------------------------------------------------------

    def _members(self, pool: str) -> list[WorkerHandle]:
        """Workers that count toward the pool's size: serving, being replaced, or pending."""
        c = self.controller
        live = [h for h in c.workers.values() if h.spec.pool == pool and not h.draining]
        return live + [h for h in c.pending.values() if h.spec.pool == pool]

    def step(self) -> None:
        """Start or drain workers so that each pool heads to its desired size."""
        now = time.monotonic()
        for pool, want in self.controller.desired.items():
            members = self._members(pool)
            if len(members) < want:
                if now - self._failed_at.get(pool, -RETRY_S) >= RETRY_S:
                    for _ in range(want - len(members)):
                        self._start(pool)
            elif len(members) > want:
                self._shrink(pool, len(members) - want)

    def _start(self, pool: str) -> None:
        h = self.controller.new_pending(pool)
        log.info("pool %s: starting worker %s", pool, h.name)
        self.starting[h.name] = self.cluster.spawn(self._bring_up(h))

    async def _bring_up(self, h: WorkerHandle) -> None:
        try:
            await self.controller.start_pending(h)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("worker %s failed to start: %s; retrying in %gs", h.name, e, RETRY_S)
            self._failed_at[h.spec.pool] = time.monotonic()
            return
        finally:
            self.starting.pop(h.name, None)
        log.info("worker %s joined pool %s", h.name, h.spec.pool)
        self.cluster.monitor.watch(h.name, h.incarnation)
        self.poke()

    def _shrink(self, pool: str, extra: int) -> None:
        c = self.controller
        pending = sorted(
            (h for h in c.pending.values() if h.spec.pool == pool), key=index, reverse=True
        )
        for h in pending[:extra]:  # a worker not started yet serves nothing: it goes first
            log.info("pool %s: cancelling pending worker %s", pool, h.name)
            task = self.starting.pop(h.name, None)
            if task is not None:
                task.cancel()
            c.cancel_pending(h.name)
            extra -= 1
        # Then workers being replaced (their node is gone, e.g. KubeRay removed the pod while the
        # size was lowered): draining one removes it at once, a healthy one keeps serving.
        replacing = [
            h
            for h in c.workers.values()
            if h.spec.pool == pool and not h.healthy and not h.draining
        ]
        for h in sorted(replacing, key=index, reverse=True)[: max(extra, 0)]:
            self.drain(h)
            extra -= 1
        if extra <= 0:
            return
        ring = c.ring.members if c.ring is not None else ()
        ready = [
            h
            for h in c.workers.values()
            if h.spec.pool == pool and h.healthy and not h.draining and h.name not in ring
        ]
        serving = [h for h in c.workers.values() if h.spec.pool == pool and h.healthy]
        serving = [h for h in serving if not h.draining]
        # Never the last one serving: a pool keeps a worker while the others are replaced.
        room = max(0, len(serving) - 1)
        chosen = sorted(ready, key=lambda h: (load(h), index(h)))[: min(extra, room)]
        for h in chosen:
            self.drain(h)
        stuck = (pool, extra - len(chosen))
        if stuck[1] > 0 and stuck not in self._stuck_said:
            self._stuck_said.add(stuck)
            log.warning(
                "pool %s: %d worker(s) above its desired size cannot drain now (a pool keeps "
                "its last serving worker; ring-group members are not drained)",
                pool,
                stuck[1],
            )

    # ---- drain ---------------------------------------------------------------------------------

    def drain(self, h: WorkerHandle) -> None:
        """Stop pairing `h`; remove it once its requests and handoffs are done."""
        h.draining = True
        self.cluster._views.pop(h.name, None)
        self.drains[h.name] = self.cluster.spawn(self._drain(h))

    def _using(self, name: str) -> list[Any]:
        return [
            st
            for st in self.cluster.requests.values()
            if st.attempt is not None and st.attempt.uses(name)
        ]

    async def _drain(self, h: WorkerHandle) -> None:
        name, cl = h.name, self.cluster
        start = last_log = time.monotonic()
        moved = False
        log.info("draining %s: %d request(s) to finish", name, len(self._using(name)))
        try:
            while True:
                using = self._using(name)
                handoffs = cl.ledger.involving(name)
                if not using and not handoffs:
                    break
                now = time.monotonic()
                if not moved and now - start >= self.drain_timeout_s:
                    moved = True
                    log.warning(
                        "drain of %s: %d request(s) still running after %gs; moving them "
                        "(they resume elsewhere from the tokens already sent)",
                        name,
                        len(using),
                        self.drain_timeout_s,
                    )
                    for st in using:
                        cl.restart(st, f"{name} is draining")
                elif now - last_log >= DRAIN_LOG_S:
                    last_log = now
                    log.info(
                        "draining %s: %d request(s), %d handoff(s) left (%.0fs)",
                        name,
                        len(using),
                        len(handoffs),
                        now - start,
                    )
                await asyncio.sleep(DRAIN_POLL_S)
            await self._remove(h)
        finally:
            self.drains.pop(name, None)
        log.info("drained and removed %s (%.1fs)", name, time.monotonic() - start)
        self.poke()

    async def _remove(self, h: WorkerHandle) -> None:
        name, cl = h.name, self.cluster
        h.incarnation += 1  # its poller stops; a late death report is ignored
        h.healthy = False
        cl.events.forget_worker(name)
        await self.controller.remove(name)
        cl.observer.worker_removed(name)  # its gauges stop being exported

"""Background prefetcher: loads forecast experts, nearest forecast first, yielding to demand loads.

Demand loads preempt: the worker starts no read while a demand load is pending, so at most the one
expert read already in flight can overlap a demand (that read is a separate request the device
serves in parallel; a demand for that very expert waits for it instead of reading twice). A token
bucket caps prefetch bandwidth; forecasts whose layer has already run are dropped as stale.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable

from batonserve.workers.expert_store.types import ExpertKey


class Prefetcher:
    """A single worker thread draining a priority queue of (forecast tick, key)."""

    def __init__(
        self,
        load: Callable[[ExpertKey, int], None],
        current_tick: Callable[[], int],
        bandwidth_bytes_per_s: float,
        expert_bytes: int,
    ) -> None:
        self._load = load  # load(key, tick): read + insert if still admitted; the store counts it
        self._tick = current_tick
        self._rate = bandwidth_bytes_per_s
        self._bytes = expert_bytes
        self._cv = threading.Condition()
        self._queue: list[tuple[int, int, ExpertKey]] = []
        self._queued: set[ExpertKey] = set()
        self._seq = 0
        self._demand_pending = 0
        self._busy = False
        self._stop = False
        self._budget_t = time.monotonic()
        self.dropped_stale = 0
        self._thread = threading.Thread(target=self._run, name="expert-prefetch", daemon=True)
        self._thread.start()

    def submit(self, tick: int, keys: list[ExpertKey]) -> None:
        """Queue `keys` forecast for layer tick `tick` (duplicates already queued are ignored)."""
        with self._cv:
            added = False
            for key in keys:
                if key in self._queued:
                    continue
                self._queued.add(key)
                heapq.heappush(self._queue, (tick, self._seq, key))
                self._seq += 1
                added = True
            if added:  # waking the worker for nothing costs the forward a GIL hand-off
                self._cv.notify_all()

    def demand_begin(self) -> None:
        """A demand load starts: hold back new prefetch reads."""
        with self._cv:
            self._demand_pending += 1

    def demand_end(self) -> None:
        """A demand load finished."""
        with self._cv:
            self._demand_pending -= 1
            if self._demand_pending == 0 and self._queue:
                self._cv.notify_all()

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until the queue is empty and no read is in flight (tests, end of a run)."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._queue or self._busy) and time.monotonic() < deadline:
                self._cv.wait(0.01)

    def close(self) -> None:
        """Stop the worker (queued forecasts are dropped)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5.0)

    def _throttle(self) -> None:
        """Token bucket: the next read may start when the budget has room for one expert."""
        if self._rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._budget_t)
        self._budget_t = start + self._bytes / self._rate
        if start > now:
            time.sleep(start - now)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._queue or self._demand_pending > 0):
                    self._cv.wait(0.05)
                if self._stop:
                    return
                tick, _, key = heapq.heappop(self._queue)
                self._queued.discard(key)
                if tick <= self._tick():  # its layer already started: demand serves it
                    self.dropped_stale += 1
                    self._cv.notify_all()
                    continue
                self._busy = True
            try:
                self._throttle()
                self._load(key, tick)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

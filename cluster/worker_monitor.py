"""One long-poll loop per worker incarnation, turned into typed events for the cluster.

The monitor knows nothing of requests or handoffs: it says what a worker returned
(`WorkerPolled`) or that it stopped answering or reports an engine error (`WorkerLost`). A loop
ends by itself when its worker is replaced or removed (the handle's incarnation moves on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from batonserve.cluster.controller import Controller
from batonserve.workers.worker_types import PollResult

POLL_S = 0.5  # how long one long-poll waits on the worker for news


@dataclass(frozen=True)
class WorkerPolled:
    """A worker's outputs, handoff events and stats since its previous poll."""

    worker: str
    result: PollResult


@dataclass(frozen=True)
class WorkerLost:
    """A worker's poll failed or its engine reported an error: it is gone as of `incarnation`."""

    worker: str
    incarnation: int
    why: str


WorkerEvent = WorkerPolled | WorkerLost


class WorkerMonitor:
    """Polls every worker it watches and hands each result to `sink` (see module docstring)."""

    def __init__(
        self,
        controller: Controller,
        sink: Callable[[WorkerEvent], None],
        live_handoffs: Callable[[str], tuple[int, ...]],
        spawn: Callable[[Coroutine[Any, Any, None]], object],
    ) -> None:
        self.controller = controller
        self.sink = sink
        self.live_handoffs = live_handoffs  # the handoffs the cluster still owns on a worker
        self.spawn = spawn
        self.closing = False

    def watch(self, name: str, incarnation: int) -> None:
        """Start polling this incarnation of `name` (a replacement gets a new call)."""
        self.spawn(self._loop(name, incarnation))

    async def _loop(self, name: str, incarnation: int) -> None:
        h = self.controller.workers.get(name)
        if h is None:
            return  # removed (drained) before its poller started
        while not self.closing and h.incarnation == incarnation:
            try:
                owned = self.live_handoffs(name)
                result: PollResult = await h.actor.poll.remote(POLL_S, owned)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.sink(WorkerLost(name, incarnation, f"poll failed: {type(e).__name__}"))
                return
            if h.incarnation != incarnation:
                return  # replaced or removed (drained) meanwhile
            self.sink(WorkerPolled(name, result))
            if not result.stats.healthy:
                why = f"engine error: {result.stats.error[-300:]}"
                self.sink(WorkerLost(name, incarnation, why))
                return

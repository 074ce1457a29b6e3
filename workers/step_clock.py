"""What a worker measures about its own steps for the router's vLLM-style metrics.

Queue time is "added to this engine until first scheduled", which only the worker sees (the
router sees the first token, which would make it TTFT); tokens per step is vLLM's
iteration_tokens_total. Both are durations and counts, so no clock crosses a process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from batonserve.workers.request import Request, RequestStatus
from batonserve.workers.scheduler import Scheduler, StepPlan

MAX_STEP_RECORDS = 4096  # step token counts kept between two polls at most (the oldest go first)


class StepClock:
    """Per-request queue time and per-step token counts, kept until the next poll takes them."""

    def __init__(self, scheduler: Scheduler, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self._scheduler = scheduler
        self._added: dict[str, float] = {}  # request id -> when it was handed to the engine
        self._queue_s: dict[str, float] = {}  # request id -> seconds until its first step
        self._step_tokens: list[int] = []
        self._step_start = now()
        schedule = scheduler.schedule

        def counted() -> StepPlan:
            # Wraps whatever schedule is now (the engine adapter may have wrapped it already).
            self._step_start = self._now()
            plan = schedule()
            if plan.num_batched_tokens > 0:
                self._step_tokens.append(plan.num_batched_tokens)
                del self._step_tokens[:-MAX_STEP_RECORDS]
            return plan

        scheduler.schedule = counted  # type: ignore[method-assign]

    def added(self, request_id: str) -> None:
        """The request was just handed to the engine."""
        self._added.setdefault(request_id, self._now())

    def stepped(self, finished: Iterable[str]) -> None:
        """After a step: requests that left the waiting queue were first scheduled in it."""
        requests: Mapping[str, Request] = self._scheduler.requests
        done = set(finished)
        for rid, t in list(self._added.items()):
            req = requests.get(rid)
            if rid in done or (req is not None and req.status not in _NOT_YET):
                self._queue_s[rid] = max(0.0, self._step_start - t)
            elif req is None:
                pass  # refused or aborted before it ran: nothing to report
            else:
                continue
            del self._added[rid]

    def take_queue_s(self, request_id: str) -> float:
        """Its queue time once, with its first output; -1 when unknown (or already taken)."""
        return self._queue_s.pop(request_id, -1.0)

    def take_step_tokens(self) -> tuple[int, ...]:
        """Tokens of each step since the last call."""
        out, self._step_tokens = tuple(self._step_tokens), []
        return out


_NOT_YET = (RequestStatus.WAITING, RequestStatus.IMPORTING)

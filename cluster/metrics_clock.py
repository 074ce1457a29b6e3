"""Per-request timing for `Metrics`: the router holds one `RequestClock` per admitted request.

It measures queue time, TTFT and inter-token gaps with a monotonic clock and reports each event
to `Metrics` exactly once, so the in-flight/waiting/running gauges always balance, also when a
request ends by error or cancellation in a `finally` block.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from batonserve.cluster.api import Usage
from batonserve.cluster.metrics import Metrics
from batonserve.cluster.metrics_inputs import RequestFinished, RequestRejected


class RequestClock:
    """Times one admitted request and reports it to `Metrics` (no request id is ever exported)."""

    def __init__(
        self,
        metrics: Metrics,
        prompt_tokens: int,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._metrics = metrics
        self._now = now
        self._prompt_tokens = prompt_tokens
        self._admitted_at = now()
        self._scheduled_at: float | None = None  # as the cluster reported it, or the first token
        self._exact_schedule = False  # the cluster said when (else the first token stands in)
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._generated = 0
        self._started = False
        self._done = False
        metrics.request_admitted()

    @property
    def done(self) -> bool:
        """True once finished() has reported the request."""
        return self._done

    def started(self, at: float | None = None) -> None:
        """A worker first scheduled the request, at monotonic time `at` (default now); once.

        The queue time itself is reported with finished(), so a schedule time the cluster learns
        after the first token (a KV handoff that overtook the prefill report) still counts.
        """
        if self._done:
            return
        if at is not None and not self._exact_schedule:
            self._exact_schedule = True
            self._scheduled_at = min(max(at, self._admitted_at), self._now())
        if self._started:
            return
        self._started = True
        if self._scheduled_at is None:
            self._scheduled_at = self._now()
        self._metrics.request_started()

    def tokens(self, count: int, scheduled_at: float | None = None) -> None:
        """`count` new tokens were sent to the client (one TokenDelta)."""
        if self._done:
            return
        if scheduled_at is not None:
            self.started(scheduled_at)
        if count <= 0:
            return
        # A first delta means the request runs somewhere, even if the cluster never said so.
        self.started()
        t = self._now()
        if self._last_token_at is None:
            self._first_token_at = t
            self._metrics.first_token(t - self._admitted_at)
            # Extra tokens in the first delta arrived together with the first: no gap to report.
        else:
            self._metrics.inter_token(t - self._last_token_at, count)
        self._last_token_at = t
        self._generated += count

    def rejected(self, reason: str, code: str = "RESOURCE_EXHAUSTED") -> None:
        """The cluster refused the request before it started (counts as a rejection, once)."""
        if self._done:
            return
        if self._started:
            raise RuntimeError("RequestClock.rejected: the request already started; use finished")
        self._done = True
        self._metrics.request_rejected(RequestRejected(reason, code), was_admitted=True)

    def finished(
        self, code: str, finish_reason: str | None = None, usage: Usage | None = None
    ) -> None:
        """The stream ended with gRPC status `code`; only the first call reports (idempotent)."""
        if self._done:
            return
        self._done = True
        sched, first, last = self._scheduled_at, self._first_token_at, self._last_token_at
        self._metrics.request_finished(
            RequestFinished(
                code=code,
                finish_reason=finish_reason,
                prompt_tokens=usage.prompt_tokens if usage else self._prompt_tokens,
                generation_tokens=usage.completion_tokens if usage else self._generated,
                cached_tokens=usage.cached_tokens if usage else 0,
                duration_seconds=self._now() - self._admitted_at,
                started=self._started,
                queue_seconds=None if sched is None else sched - self._admitted_at,
                prefill_seconds=None if sched is None or first is None else max(0.0, first - sched),
                decode_seconds=None if first is None or last is None else last - first,
                inference_seconds=None if sched is None or last is None else max(0.0, last - sched),
            )
        )


__all__ = ["RequestClock"]

"""Runs requests on the cluster: tracks what is in flight, aborts what the client abandons."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from batonserve.cluster.api import AdmissionRejected, ClusterAPI, GenerateRequest, TokenDelta, Usage
from batonserve.cluster.metrics import Metrics
from batonserve.cluster.metrics_clock import RequestClock
from batonserve.cluster.metrics_inputs import RequestRejected
from batonserve.cluster.router.errors import RequestError, status_of

log = logging.getLogger("batonserve.router")


class Dispatcher:
    """The one place that calls ClusterAPI.generate/abort, for both protocols."""

    def __init__(self, cluster: ClusterAPI, metrics: Metrics | None = None) -> None:
        self.cluster = cluster
        self.metrics = metrics
        self.draining = False
        self._inflight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inflight(self) -> int:
        """Requests admitted and not yet finished."""
        return len(self._inflight)

    def admitting(self) -> bool:
        """True while new requests are accepted (not draining and the cluster is ready)."""
        return not self.draining and self.cluster.ready()

    def refused(self, exc: BaseException) -> None:
        """Count a request that failed before reaching the cluster (bad input, unknown model)."""
        if self.metrics is not None:
            code = status_of(exc)
            self.metrics.request_rejected(RequestRejected(code.name.lower(), code.name))

    async def stream(
        self, request: GenerateRequest, n: int | None = 1
    ) -> AsyncIterator[TokenDelta]:
        """The request's deltas; a consumer that stops early (cancel, deadline) aborts it.

        `n`: the client request's number of choices, given with its first choice only (metrics).
        """
        rid = request.request_id
        if self.draining:
            err = RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            self.refused(err)
            raise err
        if rid in self._inflight:
            err = RequestError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already running"
            )
            self.refused(err)
            raise err
        self._inflight.add(rid)
        self._idle.clear()
        clock = RequestClock(self.metrics, len(request.prompt_token_ids)) if self.metrics else None
        if self.metrics is not None:
            self.metrics.request_params(request.sampling.max_tokens, n)
        code, reason = "CANCELLED", None  # unless the stream ends otherwise
        usage: Usage | None = None
        finished = False
        deltas: AsyncIterator[TokenDelta] | None = None
        try:
            deltas = self.cluster.generate(request)  # AdmissionRejected/ClusterUnavailable here
            async for delta in deltas:
                finished = delta.finish_reason is not None
                if clock is not None:
                    clock.tokens(len(delta.token_ids), delta.scheduled_at)
                if finished:
                    code, reason, usage = "OK", delta.finish_reason, delta.usage
                yield delta
                if finished:
                    break
        except AdmissionRejected as e:
            if clock is not None:
                clock.rejected(e.reason)
            raise
        except Exception as e:
            code = status_of(e).name
            raise
        finally:
            if clock is not None:
                clock.finished(code, reason, usage)
            if deltas is not None and not finished:
                # Cancelled, deadline passed, or failed: free its KV blocks. Shielded so a
                # second cancel cannot leak the request in the cluster.
                try:
                    await asyncio.shield(self.cluster.abort(rid))
                except Exception:
                    log.exception("abort of request %s failed", rid)
            aclose = getattr(deltas, "aclose", None)
            if aclose is not None:
                await aclose()
            self._inflight.discard(rid)
            if not self._inflight:
                self._idle.set()

    async def drain(self, grace_period_s: float) -> bool:
        """Stop admitting, wait for in-flight requests; after the grace period abort the rest.

        Returns True when everything finished within the grace period.
        """
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace_period_s)
            return True
        except TimeoutError:
            left = sorted(self._inflight)
            log.warning("grace period over: aborting %d request(s)", len(left))
            for rid in left:
                await self.cluster.abort(rid)
            return False

"""The router's error type and how each failure maps to a gRPC status code."""

from __future__ import annotations

import logging
import uuid

import grpc

from batonserve.cluster.api import AdmissionRejected, ClusterUnavailable

log = logging.getLogger("batonserve.router")


class RequestError(Exception):
    """A request fails with a gRPC status code and a message for the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, problem: str) -> RequestError:
    """INVALID_ARGUMENT whose message starts with the field's name."""
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception ends its RPC with (without logging anything)."""
    if isinstance(exc, RequestError):
        return exc.code
    if isinstance(exc, AdmissionRejected):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ClusterUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def to_request_error(exc: BaseException, method: str) -> RequestError:
    """Translate any exception from a handler; unknown ones are bugs: logged, sent as INTERNAL."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, AdmissionRejected):
        return RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"admission refused: {exc or 'cluster is full'}"
        )
    if isinstance(exc, ClusterUnavailable):
        return RequestError(
            grpc.StatusCode.UNAVAILABLE, f"cluster unavailable: {exc or 'no healthy worker'}"
        )
    # A bug: the client gets an id to quote, never our traceback or exception text.
    incident = uuid.uuid4().hex[:12]
    log.error("internal error in %s (incident %s)", method, incident, exc_info=exc)
    return RequestError(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the RPC with the status that `exc` maps to (never returns)."""
    err = to_request_error(exc, method)
    await context.abort(err.code, err.message)

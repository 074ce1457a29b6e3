"""Optional bearer-token auth: every RPC but health needs `authorization: Bearer <token>`."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from batonserve.cluster.config import AuthConfig
from batonserve.cluster.schema import ConfigError

# Health stays open so load balancers and Kubernetes probes need no secret.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def load_token(cfg: AuthConfig, environ: Mapping[str, str]) -> str | None:
    """The configured token (from a file or a named environment variable), or None for no auth."""
    if cfg.token_file and cfg.token_env:
        raise ConfigError("router.auth: set token_file or token_env, not both")
    if cfg.token_file:
        try:
            token = Path(cfg.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(
                f"router.auth.token_file: cannot read {cfg.token_file}: {e.strerror}"
            ) from None
        where = "router.auth.token_file"
    elif cfg.token_env:
        token = environ.get(cfg.token_env, "").strip()
        where = f"router.auth.token_env (${cfg.token_env})"
    else:
        return None
    if not token:
        raise ConfigError(f"{where}: the token is empty")
    return token


def _unauthenticated(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the right bearer token (constant-time compare)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass health and authorized calls through; answer the rest UNAUTHENTICATED."""
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        got = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value if isinstance(value, str) else value.decode("latin-1")
        if not got:
            return _unauthenticated(handler, "missing authorization: Bearer <token> metadata")
        if not hmac.compare_digest(got.encode(), self._expected):
            return _unauthenticated(handler, "invalid bearer token")
        return handler

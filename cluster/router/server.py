"""The grpc.aio server: both protocols, health, reflection, TLS, auth, and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from batonserve.cluster.api import ClusterAPI
from batonserve.cluster.config import RouterConfig, TLSConfig
from batonserve.cluster.metrics import Metrics
from batonserve.cluster.router.auth import BearerTokenInterceptor
from batonserve.cluster.router.dispatch import Dispatcher
from batonserve.cluster.router.generation import GenerationService
from batonserve.cluster.router.handlers import generic_handler
from batonserve.cluster.router.kserve import KServeService
from batonserve.cluster.schema import ConfigError
from batonserve.proto import generation_pb2, kserve_v2_pb2
from batonserve.workers.tokenizer import Tokenizer

log = logging.getLogger("batonserve.router")

GENERATION = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
KSERVE = kserve_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICES = (GENERATION.full_name, KSERVE.full_name)
HEALTH_POLL_S = 0.5  # how often readiness is copied from the cluster into the health service


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files, or None for plaintext."""
    if not tls.cert_file and not tls.key_file:
        return None
    if not (tls.cert_file and tls.key_file):
        raise ConfigError("router.tls: set both cert_file and key_file")
    pems = []
    for key in ("key_file", "cert_file"):
        path = getattr(tls, key)
        try:
            pems.append(Path(path).read_bytes())
        except OSError as e:
            raise ConfigError(f"router.tls.{key}: cannot read {path}: {e.strerror}") from None
    return grpc.ssl_server_credentials([(pems[0], pems[1])])


class RouterServer:
    """One port serving batonserve.v1.Generation, KServe v2, health and reflection."""

    def __init__(
        self,
        config: RouterConfig,
        cluster: ClusterAPI,
        tokenizer: Tokenizer,
        version: str,
        token: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.dispatcher = Dispatcher(cluster, metrics)
        self.health = health_aio.HealthServicer()
        self._credentials = server_credentials(config.tls)
        interceptors = [BearerTokenInterceptor(token)] if token else []
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a taken port is an error, not a shared listener
            ],
        )
        self._server.add_generic_rpc_handlers(
            (
                generic_handler(GENERATION, GenerationService(self.dispatcher, tokenizer, version)),
                generic_handler(
                    KSERVE,
                    KServeService(self.dispatcher, tokenizer, version),
                    malformed_aware=("ModelInfer",),
                ),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if config.reflection:
            names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
            reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self._server)
        self._poll: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful when config.port is 0)."""
        address = f"{self.config.host}:{self.config.port}"
        try:
            if self._credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, self._credentials)
        except RuntimeError:
            raise ConfigError(
                f"router.port: cannot listen on {address} (in use, or a bad router.host?)"
            ) from None
        await self._server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)  # liveness
        await self._update_health()
        self._poll = asyncio.create_task(self._poll_health())
        return self.port

    async def _update_health(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.dispatcher.admitting()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in SERVICES:
            await self.health.set(name, status)

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            try:
                await self._update_health()
            except Exception:
                log.exception("readiness check failed")

    async def drain(self, grace_period_s: float | None = None) -> bool:
        """Health goes NOT_SERVING, new requests get UNAVAILABLE, in-flight ones may finish.

        Returns True when all finished within the grace period (else the rest were aborted).
        """
        if self._poll is not None:
            self._poll.cancel()
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        grace = self.config.grace_period_s if grace_period_s is None else grace_period_s
        return await self.dispatcher.drain(grace)

    async def stop(self, grace_s: float = 1.0) -> None:
        """Stop the server; RPCs still running after grace_s are cancelled."""
        if self._poll is not None:
            self._poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll
        await self._server.stop(grace_s)

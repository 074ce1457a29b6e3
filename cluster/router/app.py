"""`batonserve serve` as a coroutine: start the cluster, serve, drain on SIGTERM, shut down."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from importlib import metadata
from typing import Protocol, TextIO

from batonserve.cluster.api import ClusterAPI
from batonserve.cluster.config import ServeConfig
from batonserve.cluster.metrics import Metrics
from batonserve.cluster.router.auth import load_token
from batonserve.cluster.router.chat_template import ChatTemplate
from batonserve.cluster.router.openai_server import OpenAIServer
from batonserve.cluster.router.server import SERVICES, RouterServer
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.tokenizer import Tokenizer

log = logging.getLogger("batonserve.router")


class ManagedCluster(ClusterAPI, Protocol):
    """A cluster the server started and must shut down (workers, and Ray if it started it)."""

    async def shutdown(self) -> None:
        """Stop the workers and the local Ray instance if this process started it."""
        ...


ClusterFactory = Callable[[ServeConfig, Callable[[str], None]], Awaitable[ManagedCluster]]


def version() -> str:
    """batonserve's installed version."""
    try:
        return metadata.version("batonserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def load_tokenizer(model: str) -> Tokenizer:
    """The served model's tokenizer (the router tokenizes text prompts itself)."""
    tok = Tokenizer.from_model_dir(resolve_model_dir(model))
    if tok is None:
        raise ValueError(f"model: {model!r} has no tokenizer.json; the router needs one")
    return tok


async def serve(
    config: ServeConfig,
    start_cluster: ClusterFactory,
    environ: Mapping[str, str],
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set), then drain and shut everything down."""

    def say(msg: str) -> None:
        print(f"batonserve: {msg}", file=out, flush=True)

    token = load_token(config.router.auth, environ)  # config errors before any slow start
    tokenizer = load_tokenizer(config.model)
    template = ChatTemplate.for_model(resolve_model_dir(config.model), config.router.chat_template)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    say(f"starting the cluster for model {config.model!r}")
    cluster = await start_cluster(config, say)  # Ctrl-C here interrupts the load as usual
    # After the cluster is up, so the Ray mirror of the series finds Ray initialized.
    info = cluster.model_info()
    metrics = Metrics(info.name, max_model_len=info.context_length)
    attach = getattr(cluster, "attach_metrics", None)
    if attach is not None:
        attach(metrics)  # worker stats, handoffs, pool changes and restarts come from the cluster
    router: RouterServer | None = None
    http: OpenAIServer | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        host, mport = config.router.metrics_host, config.router.metrics_port
        merged = getattr(cluster, "start_metrics_server", None)  # a cluster in its own actor
        metrics_port = (
            merged(metrics, host, mport) if merged else metrics.start_http_server(host, mport)
        )
        router = RouterServer(config.router, cluster, tokenizer, version(), token, metrics)
        port = await router.start()
        scheme = "grpcs" if config.router.tls.cert_file else "grpc"
        say(f"router listening on {config.router.host}:{port} ({scheme}; {', '.join(SERVICES)})")
        if config.router.http_enabled:
            http = OpenAIServer(config.router, router.dispatcher, tokenizer, template, token)
            http_port = await http.start()
            chat = "" if template is not None else "; no chat template: chat requests get 400"
            say(f"OpenAI API on {http.scheme}://{config.router.host}:{http_port}/v1{chat}")
        say(f"metrics on http://{config.router.metrics_host}:{metrics_port}/metrics")
        say("ready" if cluster.ready() else "waiting for workers")
        await stop.wait()
        say(
            f"draining: {router.dispatcher.inflight} request(s) in flight, "
            f"grace period {config.router.grace_period_s:g}s"
        )
        clean = await router.drain()
        say("drained" if clean else "grace period over; aborted the rest")
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if http is not None:
            await http.stop()
        if router is not None:
            await router.stop()
        metrics.close()
        await cluster.shutdown()
        if getattr(cluster, "router_id", None):
            say("left the cluster running (`batonserve stop` tears it down)")
        say("stopped")

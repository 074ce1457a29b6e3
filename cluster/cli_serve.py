"""`batonserve serve`: start (or join) Ray, the worker pools and the gRPC router."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from batonserve.cluster.config import PoolConfig, ServeConfig, load_config
from batonserve.cluster.env import environ
from batonserve.cluster.router.app import ClusterFactory, ManagedCluster, serve
from batonserve.cluster.schema import ConfigError

# Flag -> dotted config key; flags override the --config file.
_OVERRIDES = {
    "model": "model",
    "host": "router.host",
    "port": "router.port",
    "metrics_port": "router.metrics_port",
    "http_port": "router.http_port",
    "chat_template": "router.chat_template",
    "ray_address": "ray.address",
}
_POOL_FLAGS = {"prefill_workers": "prefill", "decode_workers": "decode", "mixed_workers": "mixed"}


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model over gRPC (local Ray, the demo model, 127.0.0.1:8001 by default)",
    )
    p.add_argument("--config", metavar="FILE", help="YAML config (the Helm values schema)")
    p.add_argument("--model", help="bundled name (demo, demo-moe) or a Hugging Face model dir")
    p.add_argument("--host", help="router address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="router port (default 8001)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 9400)")
    p.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP API port (default 8000)")
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template for /v1/chat/completions (overrides the model's own)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    for flag, role in _POOL_FLAGS.items():
        p.add_argument(
            f"--{flag.replace('_', '-')}", type=int, metavar="N", help=f"workers in the {role} pool"
        )
    p.set_defaults(func=run)


def _with_pool_sizes(cfg: ServeConfig, sizes: dict[str, int]) -> ServeConfig:
    """Set the replica count of the pool of each given role (adding the pool if missing)."""
    pools = list(cfg.pools)
    for role, n in sizes.items():
        flag = f"--{role}-workers"
        if n < 0:
            raise ConfigError(f"{flag}: must be >= 0, got {n}")
        idx = [i for i, p in enumerate(pools) if p.role == role]
        if len(idx) > 1:
            raise ConfigError(
                f"{flag}: the config has {len(idx)} {role} pools; set their replicas in the file"
            )
        if idx:
            pools[idx[0]] = replace(pools[idx[0]], replicas=n)
        elif n > 0:
            pools.append(PoolConfig(name=role, role=role, replicas=n))  # type: ignore[arg-type]
    return replace(cfg, pools=tuple(pools))


def build_config(args: argparse.Namespace) -> ServeConfig:
    """The config file (if any) with the flags applied on top."""
    overrides = {
        key: getattr(args, flag)
        for flag, key in _OVERRIDES.items()
        if getattr(args, flag) is not None
    }
    cfg = load_config(args.config, overrides)
    sizes = {
        role: getattr(args, f) for f, role in _POOL_FLAGS.items() if getattr(args, f) is not None
    }
    return _with_pool_sizes(cfg, sizes) if sizes else cfg


async def _start(config: ServeConfig, progress: Callable[[str], None]) -> ManagedCluster:
    # With a Ray address the cluster lives in its own detached actor there (started, or attached
    # to when one runs): it outlives this router. Without one, this process starts a private Ray
    # instance that dies with it, so the cluster simply lives here.
    if config.ray.address:
        from batonserve.cluster.remote_cluster import connect

        return await connect(config, progress)
    from batonserve.cluster.runtime import start_cluster

    return await start_cluster(config, progress)


def real_cluster() -> ClusterFactory:
    """The Ray-backed cluster (imported late: Ray is heavy and only `serve` needs it)."""
    return _start


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    config = build_config(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    start = real_cluster()
    if args.config:  # a mounted ConfigMap: a replicas-only helm upgrade applies live
        from batonserve.cluster.config_watch import watching

        start = watching(start, lambda: build_config(args))
    return asyncio.run(serve(config, start, environ()))

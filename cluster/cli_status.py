"""`batonserve status`: the served model, the pools and their workers, from a running router."""

from __future__ import annotations

import argparse
from typing import Any

import grpc

from batonserve.cluster.api import ModelInfo, ServerInfo
from batonserve.cluster.client import (
    RouterClient,
    add_connection_args,
    options_from_args,
    rpc_failure,
)


def register(subparsers: Any) -> None:
    """Add the `status` subcommand."""
    p = subparsers.add_parser("status", help="show the pools and workers of a running server")
    add_connection_args(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the router")
    p.add_argument(
        "--ray-address",
        help="ask the cluster actor in this Ray cluster instead of a router (shows its routers)",
    )
    p.add_argument("--namespace", default="batonserve", help="Ray namespace (with --ray-address)")
    p.set_defaults(func=run)


def format_status(model: ModelInfo, info: ServerInfo) -> str:
    """A plain-text table of pools and workers."""
    lines = [
        f"model: {model.name} ({model.architecture}{', MoE' if model.is_moe else ''}; "
        f"context {model.context_length}, vocab {model.vocab_size})",
        f"pools: {', '.join(info.pools) or '-'}",
    ]
    header = (
        "WORKER",
        "POOL",
        "ROLE",
        "HEALTHY",
        "RUNNING",
        "WAITING",
        "PREFILL-TOKENS",
        "KV-USE",
        "TP",
        "MiB/RANK",
    )
    rows = [header] + [
        (
            w.name,
            w.pool,
            w.role,
            "yes" if w.healthy else "NO",
            str(w.running_requests),
            str(w.waiting_requests),
            str(w.pending_prefill_tokens),
            f"{100 * w.kv_cache_usage:.1f}%",
            str(w.tensor_parallel_size),
            "/".join(f"{b / 2**20:.1f}" for b in w.rank_param_bytes) or "-",
        )
        for w in info.workers
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    if args.ray_address:
        return _from_actor(args)
    client = RouterClient(options_from_args(args, timeout_s=args.timeout))
    try:
        print(format_status(client.model_info(), client.server_info()))
    except grpc.RpcError as e:
        return rpc_failure(e, args.target)
    finally:
        client.close()
    return 0


def _from_actor(args: argparse.Namespace) -> int:
    """The status straight from the cluster actor, with the routers reading from it."""
    import ray

    from batonserve.cluster.remote_cluster import find_actor, join_ray

    join_ray(args.ray_address, args.namespace)
    try:
        actor = find_actor(args.namespace)
        if actor is None:
            print(f"batonserve: no batonserve cluster runs in Ray namespace {args.namespace!r}")
            return 1
        ready, info = ray.get(actor.status.remote(), timeout=args.timeout)
        model = ray.get(actor.model_info.remote(), timeout=args.timeout)
        sessions = ray.get(actor.sessions.remote(), timeout=args.timeout)
        print(format_status(model, info))
        print(f"ready: {'yes' if ready else 'no'}")
        routers = ", ".join(f"{r} ({n} running)" for r, n in sorted(sessions.items())) or "none"
        print(f"routers: {routers}")
        return 0
    finally:
        ray.shutdown()

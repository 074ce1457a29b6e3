"""`batonserve stop`: drain and tear down the batonserve cluster running in a Ray cluster.

The cluster (its detached actor and every worker it owns) outlives the routers; this ends it.
Routers still attached see their streams end UNAVAILABLE and report not ready.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from batonserve.cluster.cluster_actor import ACTOR_NAME


def register(subparsers: Any) -> None:
    """Add the `stop` subcommand."""
    p = subparsers.add_parser(
        "stop", help="drain and tear down the batonserve cluster running in a Ray cluster"
    )
    p.add_argument(
        "--ray-address", default="auto", help="the Ray cluster (default: %(default)s, this node's)"
    )
    p.add_argument("--namespace", default="batonserve", help="Ray namespace (default: %(default)s)")
    p.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds running requests may take to finish (default: %(default)s)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand: 0 when stopped, 1 when no batonserve cluster runs there."""
    import ray

    from batonserve.cluster.remote_cluster import find_actor, join_ray

    if args.grace_period < 0:
        raise ValueError(f"--grace-period: must be >= 0, got {args.grace_period}")

    def say(msg: str) -> None:
        print(f"batonserve: {msg}", flush=True)

    say(f"connecting to Ray at {args.ray_address}")
    join_ray(args.ray_address, args.namespace)
    try:
        actor = find_actor(args.namespace)
        if actor is None:
            say(f"no batonserve cluster runs in Ray namespace {args.namespace!r}: nothing to stop")
            return 1
        ident = ray.get(actor.identity.remote(), timeout=30)
        names = sorted(ident["workers"])
        say(
            f"draining the cluster ({len(names)} workers, {args.grace_period:g}s for running "
            "requests to finish)"
        )
        t0 = time.monotonic()
        left = ray.get(actor.shutdown.remote(args.grace_period), timeout=args.grace_period + 120)
        if left:
            say(f"grace period over: aborted {left} request(s)")
        say(f"workers stopped ({time.monotonic() - t0:.1f}s)")
        ray.kill(actor, no_restart=True)
        _wait_gone(ray, ACTOR_NAME, args.namespace)
        for name in names:  # normally already gone with their owner; never leave one behind
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=args.namespace), no_restart=True)
        say(f"cluster actor {ACTOR_NAME!r} removed; stopped")
        return 0
    finally:
        ray.shutdown()


def _wait_gone(ray: Any, name: str, namespace: str, timeout: float = 30.0) -> None:
    """Until Ray has released the actor's name (a new `serve` may then start one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"actor {name!r} still listed {timeout:g}s after it was killed")

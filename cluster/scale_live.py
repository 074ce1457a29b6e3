"""Set the desired pool sizes of a running batonserve cluster through Ray (`batonserve scale
--ray-address`): its controller starts workers, or drains and removes them, to match."""

from __future__ import annotations

from collections.abc import Mapping


def set_live_replicas(address: str, namespace: str, targets: Mapping[str, int]) -> list[str]:
    """Ask the cluster actor at `address` for each pool's size; the refusals, each naming why."""
    import ray

    from batonserve.cluster.remote_cluster import find_actor, join_ray

    join_ray(address, namespace)
    try:
        actor = find_actor(namespace)
        if actor is None:
            return [f"no batonserve cluster runs in Ray namespace {namespace!r} at {address}"]
        refusals = []
        for pool, n in targets.items():
            why = ray.get(actor.set_replicas.remote(pool, n), timeout=30)
            if why:
                refusals.append(f"pool {pool!r}: {why}")
        return refusals
    finally:
        ray.shutdown()

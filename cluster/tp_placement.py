"""Gang placement of a tensor-parallel worker: one Ray placement group bundle per rank.

The worker actor (rank 0) goes into bundle 0; it starts its follower ranks in bundles 1..N-1
(workers/tp/serving.py). STRICT_PACK keeps a group on one node (NVLink, one host's loopback);
`pools[].tensor_parallel_spread: true` asks for PACK, which may spread it over nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from batonserve.cluster.config import PoolConfig
from batonserve.cluster.placement import StartupError, describe, rank_demand


def strategy(pool: PoolConfig) -> str:
    """The placement group strategy of `pool`'s workers."""
    return "PACK" if pool.tensor_parallel_spread else "STRICT_PACK"


async def reserve(pool: PoolConfig, name: str, timeout_s: float | None) -> Any:
    """A ready placement group of tensor_parallel_size bundles for worker `name`, or
    StartupError after `timeout_s` (None: wait, as a pending worker waits for a node)."""
    bundle = rank_demand(pool) or {"CPU": 0.001}  # Ray refuses empty bundles
    n = pool.tensor_parallel_size
    pg = placement_group([dict(bundle)] * n, strategy=strategy(pool), name=f"{name}-tp")
    try:
        await asyncio.wait_for(asyncio.wrap_future(pg.ready().future()), timeout_s)
    except asyncio.TimeoutError:
        release(pg)
        raise StartupError(
            f"worker {name} (pool {pool.name!r}): {n} ranks asking {{{describe(bundle)}}} each "
            f"could not be gang-placed ({strategy(pool)}) in {timeout_s:g}s; Ray has "
            f"{{{describe(ray.available_resources())}}} free"
        ) from None
    return pg


def rank0_options(pg: Any) -> dict[str, Any]:
    """Actor options putting the worker actor (rank 0) into bundle 0 of `pg`."""
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=False
        )
    }


def release(pg: Any) -> None:
    """Free a worker's placement group (its ranks are gone or going)."""
    if pg is not None:
        with contextlib.suppress(Exception):  # already removed
            remove_placement_group(pg)

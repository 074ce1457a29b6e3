"""Start-up placement checks: do the pools fit the Ray cluster, and how big a local Ray must be.

Plain Python over resource dicts (Ray's own names: `CPU`, `GPU`, custom resources,
`accelerator_type:<T>`), so the checks run without Ray in unit tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports StartupError; keep this module light
    from batonserve.cluster.config import PoolConfig

Resources = Mapping[str, float]


class StartupError(RuntimeError):
    """The cluster cannot start as configured; the message names the pool and the shortfall."""


def rank_demand(pool: PoolConfig) -> dict[str, float]:
    """What one rank of a worker of `pool` asks Ray for (a worker has tensor_parallel_size)."""
    demand = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    if pool.accelerator_type:
        demand[f"accelerator_type:{pool.accelerator_type}"] = 0.001  # Ray's own marker amount
    return {k: v for k, v in demand.items() if v > 0}


def worker_demand(pool: PoolConfig) -> dict[str, float]:
    """What one worker of `pool` asks Ray for: every rank's share (gang-placed on one node)."""
    n = pool.tensor_parallel_size
    return {
        k: v if k.startswith("accelerator_type:") else v * n for k, v in rank_demand(pool).items()
    }


def local_num_cpus(pools: Sequence[PoolConfig], cores: int) -> int:
    """Logical CPUs for a local Ray: the machine's cores, or more when the pools ask for more.

    A worker's CPU request is a placement unit, not a core it owns: on a 2-core machine, 1 prefill
    and 2 decode workers must still start (they share the cores) rather than wait forever.
    """
    asked = sum(p.num_cpus * p.replicas * p.tensor_parallel_size for p in pools)
    return max(cores, math.ceil(asked - 1e-9))


def describe(res: Resources) -> str:
    """`CPU=2, GPU=1`: the schedulable resources only (not Ray's node markers or memory)."""
    shown = {k: v for k, v in res.items() if not k.startswith("node:") and "memory" not in k}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "nothing"


def check_pools_fit(pools: Sequence[PoolConfig], nodes: Sequence[Resources]) -> None:
    """Raise StartupError unless every worker of every pool fits on the nodes' total resources.

    First-fit decreasing over the nodes, as Ray places actors one by one; the message names the
    first pool that does not fit, what one of its workers asks and what the cluster has.
    """
    free = [dict(n) for n in nodes]
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            totals[k] = totals.get(k, 0.0) + v
    workers = [(p, worker_demand(p)) for p in pools for _ in range(p.replicas)]
    workers.sort(key=lambda w: (-w[1].get("GPU", 0.0), -w[1].get("CPU", 0.0)))
    placed: dict[str, int] = {}
    for pool, demand in workers:
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in demand.items())), None)
        if node is None:
            missing = [k for k, v in demand.items() if totals.get(k, 0.0) < v]
            why = (
                f"the cluster has no {', '.join(missing)} at that amount"
                if missing
                else f"only {placed.get(pool.name, 0)} of its {pool.replicas} fit beside the other pools"
            )
            raise StartupError(
                f"pool {pool.name!r}: {pool.replicas} worker(s) asking {{{describe(demand)}}} each "
                f"cannot be placed ({why}); the Ray cluster has {{{describe(totals)}}} over "
                f"{len(nodes)} node(s). Lower pools[].num_cpus/num_gpus/resources or replicas, "
                "or add nodes (set ray.wait_for_resources to wait for an autoscaler)"
            )
        for k, v in demand.items():
            node[k] -= v
        placed[pool.name] = placed.get(pool.name, 0) + 1

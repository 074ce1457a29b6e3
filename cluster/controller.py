"""The controller: creates the worker pools as named Ray actors, keeps them at size, sets roles,
and builds the per-pair KV channels (rebuilt whenever a worker is replaced).

Pool sizes are desired sizes (`desired`, changed at run time by `set_replicas`); the cluster's
reconcile loop (cluster/reconcile.py) starts and drains workers to match them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray

from batonserve.cluster import tp_placement
from batonserve.cluster.config import PoolConfig, ServeConfig, ring_members
from batonserve.cluster.placement import StartupError, describe, worker_demand
from batonserve.cluster.ring import RingGroup
from batonserve.workers.config import Role
from batonserve.workers.kv_transfer.base import KVSpec
from batonserve.workers.kv_transfer.config import KVTransferConfig
from batonserve.workers.scripted_engine import ScriptedEngineConfig
from batonserve.workers.worker import Worker
from batonserve.workers.worker_types import WorkerSpec, WorkerStats

log = logging.getLogger("batonserve.controller")

# Long-polls, control calls and object-store pushes run side by side on a worker actor.
MAX_CONCURRENCY = 32
PROGRESS_S = 10.0  # a worker still starting is reported this often, with Ray's reason


@dataclass
class WorkerHandle:
    """The controller's view of one worker actor."""

    spec: WorkerSpec
    home_role: Role
    actor: Any
    role: Role
    healthy: bool = False
    stats: WorkerStats | None = None
    kv_spec: KVSpec | None = None
    incarnation: int = 0  # bumps on every replacement
    draining: bool = False  # being removed: gets no new pairings (see cluster/reconcile.py)
    placement: Any = None  # a tensor-parallel worker's placement group (one bundle per rank)

    @property
    def name(self) -> str:
        """`<pool>-<index>`."""
        return self.spec.name


def actor_options(pool: PoolConfig, name: str, namespace: str) -> dict[str, Any]:
    """Ray actor options placing a worker of `pool` (resources, accelerator type, node labels)."""
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "num_cpus": pool.num_cpus,
        "num_gpus": pool.num_gpus,
        "max_restarts": 0,  # the controller replaces dead workers itself, resuming their requests
        "max_concurrency": MAX_CONCURRENCY,
    }
    if pool.resources:
        opts["resources"] = dict(pool.resources)
    if pool.accelerator_type:
        opts["accelerator_type"] = pool.accelerator_type
    if pool.node_labels:
        opts["label_selector"] = dict(pool.node_labels)
    return opts


def _head_ip() -> str:
    """This (the head's) address for the ring group's TCPStore; 127.0.0.1 in local clusters."""
    try:
        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def _last_line(e: BaseException) -> str:
    """The part of a Ray error a person needs: its last line, the exception the worker raised."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _why_not_ready(actor: Any, pool: PoolConfig) -> str:
    """Ray's account of a worker that has not answered `ready` yet (from the GCS actor table)."""
    try:  # Ray-internal, but it needs no dashboard; pyproject bounds ray below 3
        from ray._private.state import actors

        state = str(actors(actor_id=actor._actor_id.hex()).get("State", ""))
    except Exception as e:
        return (
            f"Ray did not say why ({type(e).__name__}); it asks {{{describe(worker_demand(pool))}}}"
        )
    if state == "ALIVE":
        return "alive, still building its engine (loading the model)"
    if state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
        return (
            f"pending creation (waiting for resources, or for its process to start): it asks "
            f"{{{describe(worker_demand(pool))}}}, Ray has {{{describe(ray.available_resources())}}} free"
        )
    return f"actor state {state or 'unknown'}"


class Controller:
    """Owns the worker actors of every pool."""

    def __init__(
        self,
        config: ServeConfig,
        model: str,
        kv: KVTransferConfig,
        scripted: ScriptedEngineConfig | None = None,
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.config = config
        self.namespace = config.ray.namespace
        self.kv = kv
        self.progress = progress
        self.workers: dict[str, WorkerHandle] = {}
        # Workers being added at run time, not ready yet (waiting for a node with room).
        self.pending: dict[str, WorkerHandle] = {}
        self._pools = {p.name: p for p in config.pools}
        self.desired = {p.name: p.replicas for p in config.pools}
        self._next_index = {p.name: p.replicas for p in config.pools}  # names are never reused
        self.serving = False  # after start(): a worker that cannot be placed waits, never fails
        self.changed: Callable[[], None] = lambda: None  # wakes the reconcile loop
        self.scripted = scripted
        self.model = model
        self._channels: set[tuple[str, str]] = set()
        self._channel_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._remote = ray.remote(Worker)
        self.ring: RingGroup | None = None  # the sequence-parallel group over the prefill pool
        self._ring_tasks: set[asyncio.Task[bool]] = set()
        if config.sequence_parallel.enabled and ring_members(config):
            self.ring = RingGroup(self, config, _head_ip())
        for pool in config.pools:
            for i in range(pool.replicas):
                h = self._handle(pool, i)
                self.workers[h.name] = h

    def _handle(self, pool: PoolConfig, index: int) -> WorkerHandle:
        spec = WorkerSpec(
            name=f"{pool.name}-{index}",
            pool=pool.name,
            role=pool.role,
            model=self.model,
            engine=self.config.engine,
            kv=self.kv,
            namespace=self.namespace,
            scripted=self.scripted,
            tensor_parallel_size=pool.tensor_parallel_size,
        )
        return WorkerHandle(spec, pool.role, None, pool.role)

    async def start(self) -> None:
        """Create every actor and wait until each has built its engine."""
        await asyncio.gather(*(self._launch(h) for h in self.workers.values()))
        if self.ring is not None and not await self.ring.build():
            log.warning("the ring group could not be built: long prompts take the normal path")
        self.serving = True

    # ---- desired size -------------------------------------------------------------------------

    def set_replicas(self, pool: str, n: int) -> None:
        """Make `n` the desired size of `pool`; the reconcile loop adds or drains workers.

        Call it on the cluster's event loop (it only records the number and wakes the loop).
        Raises ValueError naming the bound when `n` is out of range; a pool's last worker is
        never drained, so `n` is at least 1.
        """
        p = self._pools.get(pool)
        if p is None:
            raise ValueError(f"pool: no pool named {pool!r}; pools are {sorted(self._pools)}")
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"replicas of pool {pool!r}: expected an integer, got {n!r}")
        low = max(1, p.min_replicas)
        if n < low:
            raise ValueError(
                f"replicas of pool {pool!r}: {n} is below {low} (min_replicas {p.min_replicas}; "
                "a pool's last worker is never drained)"
            )
        if p.max_replicas and n > p.max_replicas:
            raise ValueError(
                f"replicas of pool {pool!r}: {n} is above max_replicas {p.max_replicas}"
            )
        if self.desired[pool] != n:
            log.info("pool %s: desired replicas %d -> %d", pool, self.desired[pool], n)
            self.desired[pool] = n
        self.changed()

    def new_pending(self, pool: str) -> WorkerHandle:
        """A handle for one more worker of `pool`, under a name never used before."""
        i = self._next_index[pool]
        self._next_index[pool] = i + 1
        h = self._handle(self._pools[pool], i)
        self.pending[h.name] = h
        return h

    async def start_pending(self, h: WorkerHandle) -> None:
        """Create a pending worker's actor and wait, without a deadline, until it is ready.

        Ray keeps an actor that fits no node pending until one joins (KubeRay scaling up); the
        reason is logged every PROGRESS_S. Raises StartupError if the actor dies starting.
        """
        try:
            await self._launch(h)
        except BaseException:
            self.pending.pop(h.name, None)
            self._kill(h)
            raise
        self.pending.pop(h.name, None)
        self.workers[h.name] = h

    def cancel_pending(self, name: str) -> None:
        """Forget a worker that never became ready (its start task is cancelled by the caller)."""
        h = self.pending.pop(name, None)
        if h is not None:
            self._kill(h)

    async def remove(self, name: str) -> None:
        """Stop a drained worker for good: its name leaves `workers`, its actor ends."""
        h = self.workers.pop(name)
        h.healthy = False
        self.forget_channels(name)
        if h.actor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(h.actor.shutdown.remote(), 5)
        self._kill(h)

    @staticmethod
    def _kill(h: WorkerHandle) -> None:
        if h.actor is not None:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(h.actor, no_restart=True)
        tp_placement.release(h.placement)  # the follower ranks die with their owner
        h.placement = None

    async def _launch(self, h: WorkerHandle) -> None:
        pool = self._pools[h.spec.pool]
        spec = replace(h.spec, role=h.role)
        opts = actor_options(pool, h.name, self.namespace)
        if pool.tensor_parallel_size > 1:  # gang-place every rank before starting rank 0
            limit = None if self.serving else self.config.ray.worker_start_timeout_s
            h.placement = await tp_placement.reserve(pool, h.name, limit)
            opts.update(tp_placement.rank0_options(h.placement))
        h.actor = self._remote.options(**opts).remote(spec)
        h.stats = await self._await_ready(h, pool)
        h.kv_spec = await h.actor.kv_spec_info.remote()
        h.healthy = True
        self.progress(f"worker {h.name} ready ({h.role}, pool {h.spec.pool})")

    async def _await_ready(self, h: WorkerHandle, pool: PoolConfig) -> WorkerStats:
        """The worker's first stats once its engine is built; says why it is late, never hangs."""
        ready = asyncio.wrap_future(h.actor.ready.remote().future())
        limit = self.config.ray.worker_start_timeout_s
        start = time.monotonic()
        while True:
            left = limit - (time.monotonic() - start)
            wait = PROGRESS_S if self.serving else max(min(PROGRESS_S, left), 0)
            try:
                return await asyncio.wait_for(asyncio.shield(ready), wait)
            except asyncio.TimeoutError:
                why = await asyncio.to_thread(_why_not_ready, h.actor, pool)
                waited = time.monotonic() - start
                if self.serving:  # the cluster serves meanwhile; a node may still join
                    log.info("worker %s pending (%.0fs): %s", h.name, waited, why)
                    continue
                if waited >= limit:
                    ready.cancel()
                    raise StartupError(
                        f"worker {h.name} (pool {pool.name!r}) not ready after {limit:g}s "
                        f"(ray.worker_start_timeout_s): {why}"
                    ) from None
                self.progress(f"waiting for worker {h.name} ({waited:.0f}s): {why}")
            except ray.exceptions.RayError as e:  # the actor died, or its engine build raised
                raise StartupError(
                    f"worker {h.name} (pool {pool.name!r}) failed to start: {_last_line(e)}"
                ) from None

    async def replace(self, name: str) -> WorkerHandle:
        """Kill `name` if still alive and start a fresh actor under the same name."""
        h = self.workers[name]
        h.healthy = False
        self.forget_channels(name)
        if self.ring is not None and name in self.ring.members:
            self.ring.invalidate(f"{name} replaced")
        self._kill(h)
        # The name is only free once Ray has marked the old actor dead.
        for _ in range(200):
            try:
                ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                break
            await asyncio.sleep(0.05)
        h.incarnation += 1
        await self._launch(h)
        if self.ring is not None and name in self.ring.members:
            task = asyncio.ensure_future(self.ring.build())  # survivors rejoin with the new one
            self._ring_tasks.add(task)
            task.add_done_callback(self._ring_tasks.discard)
        return h

    async def set_role(self, name: str, role: Role) -> None:
        """Switch a worker's role (no weight reload)."""
        h = self.workers[name]
        await h.actor.set_role.remote(role)
        h.role = role

    def forget_channels(self, name: str) -> None:
        """Channels with `name` are gone; the next pairing rebuilds them."""
        self._channels = {c for c in self._channels if name not in c}

    def forget_channels_between(self, a: str, b: str) -> None:
        """The channels between a and b failed; rebuild them on next use."""
        self._channels -= {(a, b), (b, a)}

    async def ensure_channel(self, src: str, dst: str) -> None:
        """Build the src -> dst KV channel if the transport needs one and it is missing."""
        if self.kv.transport != "torch_dist" or (src, dst) in self._channels:
            return
        lock = self._channel_locks.setdefault((src, dst), asyncio.Lock())
        async with lock:
            if (src, dst) in self._channels:
                return
            s, d = self.workers[src].actor, self.workers[dst].actor
            addr = await s.kv_listen.remote(dst)
            await asyncio.wait_for(
                asyncio.gather(
                    s.kv_connect.remote(dst, addr, True), d.kv_connect.remote(src, addr, False)
                ),
                timeout=self.kv.connect_timeout_s + 5,
            )
            self._channels.add((src, dst))

    async def shutdown(self) -> None:
        """Stop every actor."""
        for task in list(self._ring_tasks):
            task.cancel()
        if self.ring is not None:
            await self.ring.shutdown()
        for name in list(self.pending):
            self.cancel_pending(name)
        for h in self.workers.values():
            if h.actor is None:
                continue
            with contextlib.suppress(Exception):
                await asyncio.wait_for(h.actor.shutdown.remote(), 5)
            self._kill(h)
            h.healthy = False

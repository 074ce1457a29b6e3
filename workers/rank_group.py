"""A leader and its follower rank actors in one torch.distributed group.

Expert-parallel (`workers/parallel/ep_serving.py`) and tensor-parallel (`workers/tp/serving.py`)
workers are built the same way: the worker actor is rank 0, hosts the group's TCPStore on a free
port, starts one follower actor per other rank, and every rank joins with a bounded timeout, so a
dead or silent rank is an error, never a hang. Ray is imported only when a group is formed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from batonserve.workers.forward_batch import ForwardBatch

GROUP_TIMEOUT_S = 60.0  # rendezvous, and any collective waiting on a dead or silent rank
STEP_TIMEOUT_S = 60.0  # the leader's wait for the followers' share of one forward
READY_TIMEOUT_S = 600.0  # followers load their weights beside the leader; big checkpoints take time

T = TypeVar("T")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def host_store(size: int) -> dist.TCPStore:
    """The leader's store, on this node's address and a port the followers learn from it."""
    import ray

    host = str(ray.util.get_node_ip_address())
    timeout = timedelta(seconds=GROUP_TIMEOUT_S)
    return dist.TCPStore(host, 0, size, True, timeout=timeout, wait_for_workers=False)


def join_group(backend: str, host: str, port: int, rank: int, size: int) -> dist.TCPStore:
    """A follower joins as its process's default group; keep the store as long as the group."""
    timeout = timedelta(seconds=GROUP_TIMEOUT_S)
    store = dist.TCPStore(host, port, size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return store


def lead_group(
    backend: str, store: dist.TCPStore, followers: list[Any], build: Callable[[], T]
) -> tuple[T, list[Any]]:
    """Rank 0 joins, builds its own part, and waits (bounded) for each follower's `ready()`.
    On any failure the followers are killed, so none outlives a worker that never started."""
    import ray

    size = 1 + len(followers)
    timeout = timedelta(seconds=GROUP_TIMEOUT_S)
    try:
        dist.init_process_group(backend, store=store, rank=0, world_size=size, timeout=timeout)
        local = build()
        ready = ray.get([f.ready.remote() for f in followers], timeout=READY_TIMEOUT_S)
    except BaseException:
        for f in followers:
            ray.kill(f, no_restart=True)
        raise
    return local, list(ready)


def wait_followers(refs: list[Any], what: str, error: type[Exception], label: str) -> list[Any]:
    """The followers' results, or `error` naming what they did not finish in STEP_TIMEOUT_S."""
    import ray

    try:
        return list(ray.get(refs, timeout=STEP_TIMEOUT_S)) if refs else []
    except ray.exceptions.GetTimeoutError:
        raise error(
            f"{label}: a rank did not finish its {what} in {STEP_TIMEOUT_S:.0f} s"
        ) from None
    except ray.exceptions.RayError as e:
        raise error(f"{label}: a rank failed ({what}): {e}") from e


class FollowerWatch:
    """Notices a dead follower while the group is idle: a step's collective notices at once, but
    an idle worker would otherwise look healthy and keep being paired (its KV lanes then fail on
    every attempt). One outstanding `ready()` call per follower, checked without waiting."""

    def __init__(self, followers: list[Any], every_s: float = 1.0) -> None:
        self.followers = followers
        self.every_s = every_s
        self._refs: list[Any] = [None] * len(followers)
        self._next = 0.0

    def check(self, error: type[Exception], label: str) -> None:
        import ray

        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.every_s
        for i, f in enumerate(self.followers):
            ref = self._refs[i]
            if ref is not None:
                done, _ = ray.wait([ref], timeout=0)
                if not done:
                    continue  # still queued behind a forward: not a sign of death
                try:
                    ray.get(done[0])
                except ray.exceptions.RayError as e:
                    raise error(f"{label}: rank {i + 1} is gone: {e}") from e
            self._refs[i] = f.ready.remote()


def cpu_batch(batch: ForwardBatch) -> ForwardBatch:
    """The batch with CPU tensors (it travels to the followers through Ray)."""
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    return ForwardBatch(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in fields.items()})

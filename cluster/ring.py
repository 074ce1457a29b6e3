"""Sequence-parallel prefill in the live cluster: the ring group over the prefill pool, and the
path of a long prompt through it.

The controller's `RingGroup` joins the first `max_group_size` workers of the first prefill pool
into one torch.distributed group (TCPStore in this process; gloo on CPU, NCCL on CUDA), once, and
again after a member is replaced or a ring prefill failed. A prompt of at least `threshold_tokens`
takes the ring of N = min(group, ceil(len / tokens_per_rank)) members: each prefills its shard and
sends its K/V rows straight to the decode worker under one handoff whose `src` is the leader (the
member holding the last position, which samples and streams the first token). The decode side
commits when every row of every layer is there; release and abort fan out to every member.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from batonserve.cluster.config import ServeConfig, ring_members
from batonserve.workers.sp_serving.config import SequenceParallelConfig
from batonserve.workers.sp_serving.report import SPStepReport
from batonserve.workers.sp_serving.types import RingJob, RingSetup, last_position_rank
from batonserve.workers.worker_types import HandoffSpec, WorkerStats

if TYPE_CHECKING:
    from batonserve.cluster.controller import Controller
    from batonserve.cluster.request_state import Attempt

log = logging.getLogger("batonserve.ring")

BUILD_TRIES = 5


@dataclass(frozen=True)
class RingChoice:
    """The ring a request takes: its size, members (by group rank) and leader's name."""

    size: int
    members: tuple[str, ...]
    leader: str


def ring_backend(config: ServeConfig) -> str:
    """NCCL when the members run on CUDA, else gloo."""
    dev = config.engine.device
    gpus = any(p.num_gpus > 0 for p in config.pools if p.role == "prefill")
    return "nccl" if dev.startswith("cuda") or (dev == "auto" and gpus) else "gloo"


class RingGroup:
    """The controller's ring group: membership, epochs, job sequence numbers, (re)builds."""

    def __init__(self, controller: Controller, config: ServeConfig, host: str) -> None:
        self.controller = controller
        self.sp: SequenceParallelConfig = config.sequence_parallel
        self.members = ring_members(config)
        self.backend = ring_backend(config)
        self.host = host
        self.epoch = 0
        self.ready = False
        self._seq = 0
        self._lock = asyncio.Lock()
        self._store: Any = None  # the TCPStore server, alive as long as the group
        self._unsupported = False  # the model cannot run sequence-parallel

    def available(self) -> int:
        """Members usable now (0 while building or when a member is unhealthy)."""
        ws = self.controller.workers
        if not self.ready or not all(ws[m].healthy for m in self.members):
            return 0
        return len(self.members)

    def invalidate(self, why: str) -> None:
        """The group must be rebuilt before its next use."""
        if self.ready:
            log.warning("ring group epoch %d invalid: %s", self.epoch, why)
        self.ready = False

    async def build(self) -> bool:
        """(Re)join every member into a fresh group; True when the ring is usable."""
        async with self._lock:
            for attempt in range(BUILD_TRIES):
                if self.ready:
                    return True
                if self._unsupported:
                    return False
                if await self._build_once():
                    return True
                await asyncio.sleep(0.5 * (attempt + 1))
            return False

    async def _build_once(self) -> bool:
        ws = self.controller.workers
        for _ in range(600):  # members being replaced come back first
            if all(ws[m].healthy and ws[m].actor is not None for m in self.members):
                break
            await asyncio.sleep(0.1)
        else:
            return False
        if self._store is None:
            self._store = dist.TCPStore(
                self.host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
            )
        self.epoch += 1
        self._seq = 0
        setups = [
            RingSetup(
                self.epoch,
                self.host,
                int(self._store.port),
                rank,
                self.members,
                self.backend,
                self.sp.timeout_s,
                self.sp.schedule,
                self.sp.layout,
            )
            for rank in range(len(self.members))
        ]
        try:
            errors = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        ws[m].actor.ring_join.remote(s)
                        for m, s in zip(self.members, setups, strict=True)
                    )
                ),
                timeout=self.sp.timeout_s + 60,
            )
        except Exception as e:
            log.warning("ring group epoch %d: join failed: %s", self.epoch, e)
            return False
        bad = [f"{m}: {e}" for m, e in zip(self.members, errors, strict=True) if e]
        if any("not supported" in e for e in errors):
            self._unsupported = True  # no retry helps: long prompts always take the normal path
        if bad:
            log.warning("ring group epoch %d: join failed: %s", self.epoch, "; ".join(bad))
            return False
        self.ready = True
        log.info("ring group epoch %d ready: %s (%s)", self.epoch, self.members, self.backend)
        return True

    def choose(self, prompt_len: int, decode: str) -> RingChoice | None:
        """The ring for a prompt, or None for the normal path."""
        size = self.sp.group_size(prompt_len, self.available())
        if size < 2:
            return None
        members = self.members[:size]
        if decode in members:  # the decode side must be another worker (its own KV channel)
            return None
        leader = members[last_position_rank(prompt_len, size, self.sp.layout)]
        return RingChoice(size, members, leader)

    def submit(self, choice: RingChoice, spec: HandoffSpec) -> None:
        """Send one job to every member (in one go: no await between numbering and sending)."""
        job = RingJob(self.epoch, self._seq, choice.size, choice.members.index(choice.leader), spec)
        self._seq += 1
        for m in self.members:  # non-participants only advance their sequence number
            self.controller.workers[m].actor.submit_ring.remote(job)

    async def shutdown(self) -> None:
        """Forget the group (actors are stopped by the controller)."""
        self.ready = False
        self._store = None


class RingRoutes:
    """The cluster's ring attempts (by worker request id) and the SP reports already passed on.

    A part of `Cluster`: it owns this state; launching an attempt stays with the cluster's
    other attempts (cluster/runtime.py).
    """

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.attempts: dict[str, RingChoice] = {}  # by worker request id, until released
        self._sp_seen: dict[str, int] = {}  # worker -> last report seq passed on

    def choose(self, prompt_len: int, decode: str) -> RingChoice | None:
        """The ring for a new attempt, or None (no group, or the normal path)."""
        ring = self.controller.ring
        return ring.choose(prompt_len, decode) if ring is not None else None

    def targets(self, worker: str, worker_request_id: str) -> tuple[str, ...]:
        """Where a release/abort for `worker` goes: every member when it is a ring's leader."""
        choice = self.attempts.get(worker_request_id)
        if choice is None or worker != choice.leader:
            return (worker,)
        del self.attempts[worker_request_id]  # sent once to all; later ones to the leader
        return choice.members

    def failed(self, a: Attempt) -> bool:
        """A ring attempt is abandoned before its commit: True when the group must be rebuilt
        (it is marked invalid here; the caller starts the rebuild)."""
        ring = self.controller.ring
        if ring is None or a.phase != "prefill" or a.worker_request_id not in self.attempts:
            return False
        ring.invalidate(f"ring attempt {a.worker_request_id} failed")
        return True

    def fresh_reports(self, name: str, stats: WorkerStats) -> list[SPStepReport]:
        """A worker's SP reports not yet passed on (each once, in order)."""
        seen = self._sp_seen.get(name, 0)
        fresh = [r for r in stats.sp_reports if r.seq > seen]
        if not fresh:
            if stats.sp_reports and stats.sp_reports[-1].seq < seen:
                self._sp_seen[name] = 0  # a restarted worker counts from 1 again
            return []
        self._sp_seen[name] = fresh[-1].seq
        return fresh

"""A worker's part in a ring group: join the group, prefill its shard of a prompt, hand its KV rows
to the decode worker, hold its blocks until released.

Runs on the worker's step-loop thread only (the worker queues every call), so it needs no locks.
Jobs run strictly in their sequence order: every collective must be entered in the same order on
every rank, and Ray may deliver two submits out of order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from batonserve.workers.engine_core import EngineCore
from batonserve.workers.handoff_io import send_layer
from batonserve.workers.kv_transfer.base import FINAL_LAYER, KVChunk, KVTransport
from batonserve.workers.outputs import CoreOutput, aborted_output
from batonserve.workers.parallel import SPGroup, shard_batch
from batonserve.workers.sp_serving.forward import SPForward
from batonserve.workers.sp_serving.report import SPStepReport
from batonserve.workers.sp_serving.types import RingJob, RingSetup, contiguous_runs
from batonserve.workers.worker_types import HandoffEvent

log = logging.getLogger("batonserve.ring")

MAX_REPORTS = 64  # recent reports kept in the stats (the cluster reads each once by seq)


class RingMember:
    """This worker's membership of the ring group (see module docstring)."""

    def __init__(self, engine: EngineCore, transport: KVTransport) -> None:
        self.engine = engine
        self.transport = transport
        self.setup: RingSetup | None = None
        self.groups: dict[int, SPGroup] = {}  # ring size -> the SPGroup of ranks 0..size-1
        self.broken = False  # a collective failed: wait for the controller's rebuild
        self._jobs: dict[int, RingJob] = {}
        self._next_seq = 0
        self.held: dict[str, float] = {}  # request id -> since when its rows hold blocks
        self.reports: deque[SPStepReport] = deque(maxlen=MAX_REPORTS)
        self._report_seq = 0

    # ---- group -------------------------------------------------------------------------------

    def join(self, setup: RingSetup) -> None:
        """(Re)build the process groups for `setup` (collective among the members)."""
        self.leave()
        if self.engine.has_sliding_window():
            # Refused before any collective: the ring never forms, long prompts go the normal way.
            raise ValueError(
                "sequence_parallel: models with sliding-window layers are not supported"
            )
        store = dist.TCPStore(
            setup.host,
            setup.port,
            is_master=False,
            timeout=timedelta(seconds=setup.timeout_s),
        )
        prefixed = dist.PrefixStore(f"ring-{setup.epoch}", store)
        dist.init_process_group(
            setup.backend,
            store=prefixed,
            rank=setup.rank,
            world_size=setup.world_size,
            timeout=timedelta(seconds=setup.timeout_s),
        )
        # One group per ring size N (ranks 0..N-1), largest first, each built only by its
        # members: torch names such groups after how many groups the process already has, so
        # every member of the next (smaller) group must have built exactly the same ones.
        timeout = timedelta(seconds=setup.timeout_s)
        for size in range(setup.world_size, 1, -1):
            if setup.rank >= size:
                break
            pg = (
                None
                if size == setup.world_size
                else dist.new_group(
                    list(range(size)), timeout=timeout, use_local_synchronization=True
                )
            )
            self.groups[size] = SPGroup(pg, timeout_s=setup.timeout_s)
        self.setup = setup
        self._jobs.clear()
        self._next_seq = 0
        self.broken = False

    def leave(self) -> None:
        """Drop the current group (a member died, or the group is being rebuilt)."""
        self.groups.clear()
        self.setup = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a dead peer's group may fail to tear down cleanly
                log.warning("ring: destroying the old process group failed: %s", e)

    # ---- jobs --------------------------------------------------------------------------------

    def offer(
        self, job: RingJob, aborted: Callable[[str], bool]
    ) -> tuple[list[CoreOutput], list[HandoffEvent]]:
        """Queue a job and run every job whose turn has come."""
        deltas: list[CoreOutput] = []
        events: list[HandoffEvent] = []
        if self.setup is None or job.epoch != self.setup.epoch:
            deltas += self._refuse(job, "the ring group was rebuilt")
            return deltas, events
        self._jobs[job.seq] = job
        while self._next_seq in self._jobs:
            j = self._jobs.pop(self._next_seq)
            self._next_seq += 1
            d, e = self._run(j, aborted)
            deltas += d
            events += e
        return deltas, events

    def queued(self, job: RingJob) -> bool:
        """The job waits for its turn here (its epoch is current and its number not yet run)."""
        return (
            self.setup is not None and job.epoch == self.setup.epoch and job.seq >= self._next_seq
        )

    def _refuse(self, job: RingJob, why: str) -> list[CoreOutput]:
        """The leader ends the attempt (the cluster retries it); others stay silent."""
        if self.setup is None or self.setup.rank != job.leader:
            return []
        h = job.handoff
        return [aborted_output(h.request_id, h.prompt_len)]

    def _run(
        self, job: RingJob, aborted: Callable[[str], bool]
    ) -> tuple[list[CoreOutput], list[HandoffEvent]]:
        assert self.setup is not None
        rank = self.setup.rank
        if rank >= job.size:
            return [], []  # not in this ring; only the sequence number advances
        if self.broken:
            return self._refuse(job, "broken group"), []
        h = job.handoff
        shard = shard_batch([h.prompt_len], None, job.size, rank, layout=self.setup.layout)
        pos = shard.spec.q_pos  # [n] global positions of this rank's rows
        n = int(pos.shape[0])
        tokens = torch.tensor(h.prompt_token_ids, dtype=torch.int64)[pos]  # [n]
        slots = self.engine.hold_rows(_hold_id(h.request_id), tokens.tolist())  # [n]
        if slots is None:
            self.broken = True  # the others will time out in the first collective
            log.warning("ring: no KV blocks for %d rows of %s", n, h.request_id)
            return self._refuse(job, "no KV blocks"), []
        self.held[h.request_id] = time.monotonic()
        runs = contiguous_runs(pos)
        send_error: list[str] = []
        nbytes = [0]

        def hook(layer: int) -> None:
            # This layer's rows are in the cache: queue them while the next layer computes.
            if send_error:
                return
            try:
                nbytes[0] += send_layer(
                    self.engine, self.transport, h.dst, h.handoff_id, layer, slots, runs
                )
            except Exception as e:
                send_error.append(str(e))

        schedule = None if self.setup.schedule == "auto" else self.setup.schedule
        dims = self.engine.attention_dims()
        sp = SPForward(self.groups[job.size], shard.spec, dims, schedule)
        last = (pos == h.prompt_len - 1).nonzero()[:, 0]
        t0 = time.perf_counter()
        try:
            logits = self.engine.run_shard(tokens, pos, slots, sp, last, hook)
        except Exception as e:  # SPCommError from a dead peer, or anything else: retry elsewhere
            self.broken = True
            self.free(h.request_id)
            log.warning("ring prefill of %s failed on rank %d: %s", h.request_id, rank, e)
            return self._refuse(job, str(e)), []
        self._report(job, sp, time.perf_counter() - t0)
        if aborted(h.request_id):
            self.free(h.request_id)
            return [], []
        if send_error:
            self.free(h.request_id)
            return [], [
                HandoffEvent(h.handoff_id, h.request_id, "failed", nbytes[0], send_error[0])
            ]
        if rank != job.leader:
            return [], []
        return self._first_token(job, logits, nbytes[0])

    def _first_token(
        self, job: RingJob, logits: torch.Tensor, nbytes: int
    ) -> tuple[list[CoreOutput], list[HandoffEvent]]:
        """Leader: sample the first token, stream it, and send the handoff's final marker."""
        h = job.handoff
        first = self.engine.sample_first(h.request_id, h.prompt_token_ids, h.params, logits)
        if first.finished:  # ended at its first token: nothing to hand off
            self.free(h.request_id)
            return [first], []
        try:
            tok = first.new_token_ids[0]
            self.transport.send(h.dst, KVChunk(h.handoff_id, FINAL_LAYER, h.prompt_len, None, tok))
        except Exception as e:
            self.free(h.request_id)
            return [], [HandoffEvent(h.handoff_id, h.request_id, "failed", nbytes, str(e))]
        return [first], []

    def _report(self, job: RingJob, sp: SPForward, total_s: float) -> None:
        assert self.setup is not None
        self._report_seq += 1
        self.reports.append(
            SPStepReport(
                seq=self._report_seq,
                request_id=job.handoff.request_id,
                schedule=sp.schedule_used,
                world_size=job.size,
                rank=self.setup.rank,
                prompt_tokens=job.handoff.prompt_len,
                compute_s=sum(m.compute_s for m in sp.metrics),
                comm_s=sum(m.comm_s for m in sp.metrics),
                exposed_comm_s=sum(m.exposed_comm_s for m in sp.metrics),
                total_s=total_s,
                bytes_sent=sum(m.bytes_sent for m in sp.metrics),
            )
        )

    # ---- blocks ------------------------------------------------------------------------------

    def free(self, request_id: str) -> None:
        """Free a request's rows (released after the decode side's ack, or aborted); idempotent."""
        if self.held.pop(request_id, None) is not None:
            self.engine.abort_request(_hold_id(request_id))

    def stale(self, older_than_s: float) -> list[str]:
        """Free rows held longer than `older_than_s` (a backstop: the cluster releases first)."""
        cut = time.monotonic() - older_than_s
        old = [r for r, since in self.held.items() if since < cut]
        for r in old:
            self.free(r)
        return old


def _hold_id(request_id: str) -> str:
    """The engine-side id of a ring request's rows: apart from the request itself, which this
    worker may also decode (a prefill worker lent to decode keeps its ring membership)."""
    return f"{request_id}@ring"

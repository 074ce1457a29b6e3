"""Discrete-event cluster simulator driving the real cluster-level and machine-level schedulers.

Events (arrival, step end, KV-transfer end) are processed in time order, ties in the order they
were scheduled. At each arrival the mixed pool may change roles, then `ClusterScheduler.schedule`
pairs the request from worker snapshots, exactly as the live controller does.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from batonserve.cluster.scheduling import (
    ClusterScheduler,
    Pairing,
    Rejection,
    RequestView,
    RoleChange,
    SchedulerConfig,
)
from batonserve.cluster.sim.design import Design, perf_key
from batonserve.cluster.sim.hardware import (
    MachineSpec,
    ModelSpec,
    kv_capacity_tokens,
    transfer_seconds,
)
from batonserve.cluster.sim.perf_model import PerfModel
from batonserve.cluster.sim.trace import TraceRequest
from batonserve.cluster.sim.worker import EngineLimits, SimWorker
from batonserve.workers.block_pool import hash_blocks
from batonserve.workers.request import Request
from batonserve.workers.sampling_params import SamplingParams

ARRIVE, STEP, XFER = 0, 1, 2


class _BlockPoolLookup:
    """PrefixLookup over the simulated workers' own block pools (what they cache right now)."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def cached_prefix_blocks(self, worker_id: str, block_hashes: Sequence[int]) -> int:
        """Leading blocks of the prompt the worker's block pool can hand out as a prefix hit."""
        return len(self._sim.workers[worker_id].blocks.find_cached(block_hashes))


def worker_machine(machine: MachineSpec, tp: int, model: ModelSpec) -> tuple[MachineSpec, int]:
    """What one worker of `tp` GPUs gets of a machine (memory, link), and workers per machine."""
    tp = tp or model.tensor_parallel
    if tp >= machine.num_gpus:
        return machine, 1
    if machine.num_gpus % tp:
        raise ValueError(
            f"tensor_parallel {tp} does not divide machine {machine.name}'s {machine.num_gpus} GPUs"
        )
    per = machine.num_gpus // tp
    # A DGX has one NIC per GPU: a worker's KV link is its GPUs' share.
    return (
        dataclasses.replace(
            machine,
            num_gpus=tp,
            link_gb_per_s=machine.link_gb_per_s / per,
            kv_capacity_tokens=machine.kv_capacity_tokens // per,
        ),
        per,
    )


@dataclass(frozen=True)
class SimConfig:
    """Everything about a simulation except the design and the trace."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: EngineLimits = field(default_factory=EngineLimits)
    layerwise_transfer: bool = True  # KV moves layer by layer while the prompt computes


@dataclass
class RequestRecord:
    """One request's fate; times in seconds of simulated time (-1: did not happen)."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefill_worker: str = ""
    decode_worker: str = ""
    mode: str = ""  # "disaggregated", "in_place" or "" when rejected
    rejected: str = ""  # a RejectReason value
    prefill_start_s: float = -1.0
    first_token_s: float = -1.0
    prefill_end_s: float = -1.0  # disaggregated: when the prompt's KV was complete
    transfer_end_s: float = -1.0
    finish_s: float = -1.0
    tokens_out: int = 0
    num_finishes: int = 0  # conservation check: exactly one for an admitted request

    @property
    def ttft(self) -> float:
        """Time to first token."""
        return self.first_token_s - self.arrival_s

    @property
    def e2e(self) -> float:
        """Arrival to last token."""
        return self.finish_s - self.arrival_s

    @property
    def tbt(self) -> float:
        """Mean time between tokens after the first (0 for a one-token answer)."""
        if self.tokens_out <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.tokens_out - 1)


class RunGuard(Protocol):
    """Watches requests as they progress and says when a run can stop (its verdict is known)."""

    def first_token(self, rec: RequestRecord) -> bool:
        """A request got its first token; True stops the run."""
        ...

    def finished(self, rec: RequestRecord) -> bool:
        """A request finished; True stops the run."""
        ...

    @property
    def reason(self) -> str:
        """Why the run was stopped ("" while it was not)."""
        ...


@dataclass
class SimResult:
    """What a run produced: per-request records, mixed-pool events, per-worker busy time."""

    design: Design
    records: list[RequestRecord]
    role_changes: list[RoleChange]
    busy_s: dict[str, float]
    end_s: float
    num_events: int
    stopped: str = ""  # the guard's reason when the run stopped before every request finished


class Simulator:
    """One design under one trace; `run()` may be called once."""

    def __init__(
        self,
        design: Design,
        model: ModelSpec,
        machines: Mapping[str, MachineSpec],
        perf: Mapping[str, PerfModel],
        config: SimConfig | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.model = model
        self.design = design
        self.cls = ClusterScheduler(self.config.scheduler, _BlockPoolLookup(self))
        lim = self.config.limits
        self.workers: dict[str, SimWorker] = {}
        for p in design.pools:
            key = perf_key(p.machine, p.tensor_parallel, model.tensor_parallel)
            if key not in perf:
                raise ValueError(f"no performance model for machine {key!r}")
            spec, per_machine = worker_machine(machines[p.machine], p.tensor_parallel, model)
            blocks = kv_capacity_tokens(spec, model) // lim.block_size
            for i in range(p.replicas * per_machine):
                wid = f"{p.name}-{i}"
                self.workers[wid] = SimWorker(wid, p.name, p.role, spec, perf[key], blocks, lim)
        self._lendable = any(w.home_role != "mixed" for w in self.workers.values())
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._records: dict[str, RequestRecord] = {}
        self._reqs: dict[str, Request] = {}  # prefill-side engine requests, for the handoff
        self._reservation: dict[str, int] = {}  # request -> decode blocks promised
        self._role_changes: list[RoleChange] = []
        self._guard: RunGuard | None = None
        self._stop = False
        self.now = 0.0

    # ---- event plumbing ----------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: object) -> None:
        assert t >= self.now, "events are never scheduled in the past"
        heapq.heappush(self._events, (t, self._seq, kind, payload))
        self._seq += 1

    def run(self, trace: Sequence[TraceRequest], guard: RunGuard | None = None) -> SimResult:
        """Simulate until every admitted request has finished, or until `guard` says stop."""
        self._guard = guard
        self._stop = False
        for r in trace:
            self._push(r.arrival_s, ARRIVE, r)
        n = 0
        while self._events and not self._stop:
            t, _, kind, payload = heapq.heappop(self._events)
            assert t >= self.now, "simulated time never goes back"
            self.now = t
            n += 1
            if kind == ARRIVE:
                assert isinstance(payload, TraceRequest)
                self._arrive(payload)
            elif kind == STEP:
                assert isinstance(payload, SimWorker)
                self._step_done(payload)
            else:
                assert isinstance(payload, str)
                self._transfer_done(payload)
        stopped = guard.reason if guard is not None and self._stop else ""
        if not stopped:
            for w in self.workers.values():
                assert not w.sched.has_unfinished() and not w.imports and w.reserved_blocks == 0
        return SimResult(
            self.design,
            list(self._records.values()),
            self._role_changes,
            {w.worker_id: w.busy_s for w in self.workers.values()},
            self.now,
            n,
            stopped,
        )

    # ---- arrivals ------------------------------------------------------------------------------

    def _arrive(self, r: TraceRequest) -> None:
        rec = RequestRecord(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens)
        assert r.request_id not in self._records, f"duplicate request id {r.request_id}"
        self._records[r.request_id] = rec
        views = [w.view() for w in self.workers.values()]
        # A cluster of mixed workers only has nothing to lend (the mixed pool would return no
        # change): skip the call, it is a tenth of a large baseline's run.
        if self._lendable:
            for ch in self.cls.rebalance(views, self.now):
                self.workers[ch.worker_id].role = ch.to_role
                self._role_changes.append(ch)
                views = [w.view() for w in self.workers.values()]
        tokens = self._prompt_tokens(r)
        hashes: tuple[int, ...] = ()
        if self.config.limits.enable_prefix_caching:
            hashes = tuple(hash_blocks(tokens, self.config.limits.block_size))
        view = RequestView(r.request_id, r.prompt_tokens, r.output_tokens, hashes, r.arrival_s)
        decision = self.cls.schedule(view, views)
        if isinstance(decision, Rejection):
            rec.rejected = decision.reason.value
            return
        assert isinstance(decision, Pairing)
        rec.prefill_worker, rec.decode_worker, rec.mode = (
            decision.prefill_worker,
            decision.decode_worker,
            decision.mode,
        )
        disagg = decision.mode == "disaggregated" and r.output_tokens > 1
        params = SamplingParams(max_tokens=r.output_tokens, ignore_eos=True)
        req = Request(r.request_id, tokens, params, prefill_only=disagg)
        pw = self.workers[decision.prefill_worker]
        if disagg:
            dw = self.workers[decision.decode_worker]
            blocks = dw.blocks_for(r.prompt_tokens)
            dw.reserved_blocks += blocks
            self._reservation[r.request_id] = blocks
            self._reqs[r.request_id] = req
        pw.add(req)
        self._kick(pw)

    def _prompt_tokens(self, r: TraceRequest) -> list[int]:
        # Token values matter only to prefix caching: each prompt gets its own filler so that
        # nothing is shared by accident, after its group's common prefix if it has one.
        if not self.config.limits.enable_prefix_caching:
            return [0] * r.prompt_tokens
        shared = min(r.shared_prefix_tokens, r.prompt_tokens) if r.shared_prefix_group >= 0 else 0
        own = -1 - len(self._records)
        return [r.shared_prefix_group] * shared + [own] * (r.prompt_tokens - shared)

    # ---- worker steps --------------------------------------------------------------------------

    def _kick(self, w: SimWorker) -> None:
        if w.busy:
            return
        dt = w.start_step()
        if dt is None:
            self._apply(w, w.flush())
            return
        for s in w.plan.seqs if w.plan else ():
            rec = self._records[s.request_id]
            if rec.prefill_start_s < 0:
                rec.prefill_start_s = self.now
        self._push(self.now + dt, STEP, w)

    def _step_done(self, w: SimWorker) -> None:
        self._apply(w, w.finish_step())
        self._try_imports(w)
        self._kick(w)

    def _apply(self, w: SimWorker, updates: Sequence) -> None:  # type: ignore[type-arg]
        for u in updates:
            rec = self._records[u.request_id]
            if u.new_token_ids:
                if rec.first_token_s < 0:
                    rec.first_token_s = self.now
                    if self._guard is not None and self._guard.first_token(rec):
                        self._stop = True
                rec.tokens_out += len(u.new_token_ids)
            if u.finished:
                self._finish(rec)
                if self._guard is not None and self._guard.finished(rec):
                    self._stop = True
            elif u.prefilled:
                self._start_handoff(rec)

    def _finish(self, rec: RequestRecord) -> None:
        rec.finish_s = self.now
        rec.num_finishes += 1
        blocks = self._reservation.pop(rec.request_id, 0)
        if blocks:  # ended on the prefill side (e.g. one-token answer): release the promise
            self.workers[rec.decode_worker].reserved_blocks -= blocks
        self._reqs.pop(rec.request_id, None)

    # ---- KV handoff ----------------------------------------------------------------------------

    def _start_handoff(self, rec: RequestRecord) -> None:
        rec.prefill_end_s = self.now
        dw = self.workers[rec.decode_worker]
        dw.queue_import(rec.request_id)
        self._try_imports(dw)

    def _try_imports(self, dw: SimWorker) -> None:
        """Start queued handoffs into `dw` while it has the blocks (FCFS)."""
        while dw.imports:
            rid = dw.imports[0]
            src_req = self._reqs[rid]
            if dw.blocks_for(src_req.num_prompt_tokens) > dw.blocks.num_free_blocks:
                return
            rec = self._records[rid]
            req = Request(
                rid,
                src_req.prompt_token_ids,
                src_req.params,
                output_token_ids=list(src_req.output_token_ids),
            )
            dw.start_import(req)
            dw.reserved_blocks -= self._reservation.pop(rid)
            pw = self.workers[rec.prefill_worker]
            total = transfer_seconds(rec.prompt_tokens, self.model, pw.machine, dw.machine)
            if self.config.layerwise_transfer and self.now == rec.prefill_end_s:
                # Layers stream out while later ones compute: only the last layer's share can
                # land after the prompt ends, unless the link itself is the bottleneck.
                start = max(rec.prefill_start_s, pw.link_free_at)
                done = max(start + total, self.now + total / self.model.num_layers)
            else:
                done = max(self.now, pw.link_free_at) + total
            pw.link_free_at = done
            self._push(done, XFER, rid)

    def _transfer_done(self, rid: str) -> None:
        rec = self._records[rid]
        rec.transfer_end_s = self.now
        pw = self.workers[rec.prefill_worker]
        dw = self.workers[rec.decode_worker]
        pw.release(rid)  # the decode side acknowledged: the prefill side frees its blocks
        self._reqs.pop(rid, None)
        dw.commit_import(rid)
        self._kick(dw)
        self._kick(pw)

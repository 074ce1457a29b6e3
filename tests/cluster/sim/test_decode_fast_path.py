"""The decode path's shortcuts (scheduler `_seq`/`_update`/`update`, the paper batching's grow
check) give exactly what the general code gives: seeded random runs, small KV pools so that
preemption happens, both batching rules, every request's record compared."""

from __future__ import annotations

import dataclasses
import random

import pytest
from sim_helpers import TOY, TOY_MACHINE

from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.cluster.sim.design import Design, PoolSpec
from batonserve.cluster.sim.paper_batching import SplitwiseBatching
from batonserve.cluster.sim.perf_model import ConstantPerfModel
from batonserve.cluster.sim.simulator import SimConfig, Simulator
from batonserve.cluster.sim.trace import TraceRequest
from batonserve.cluster.sim.worker import EngineLimits
from batonserve.workers.request import Request, RequestStatus
from batonserve.workers.scheduler import (
    RequestUpdate,
    ScheduledSeq,
    Scheduler,
    StepPlan,
    StepResult,
)

# ---- the general code, as it was before the shortcuts: the slow reference --------------------


def _slow_seq(self: Scheduler, req: Request, n: int) -> ScheduledSeq:
    start = req.num_computed_tokens
    return ScheduledSeq(
        request_id=req.request_id,
        token_ids=tuple(req.tokens_between(start, start + n)),
        start_pos=start,
        block_ids=tuple(req.block_ids),
        sample=start + n == req.num_tokens,
    )


def _slow_update_of(req: Request, new: tuple[int, ...]) -> RequestUpdate:
    return RequestUpdate(
        request_id=req.request_id,
        new_token_ids=new,
        finished=req.is_finished,
        finish_reason=req.finish_reason,
        prefilled=req.status is RequestStatus.PREFILLED,
        num_prompt_tokens=req.num_prompt_tokens,
        num_output_tokens=len(req.output_token_ids),
        num_cached_tokens=max(req.num_cached_tokens, 0),
    )


def _slow_update(self: Scheduler, plan: StepPlan, result: StepResult) -> list[RequestUpdate]:
    sampled = {s.request_id: s.token_id for s in result.sampled}
    updates, self._pending = self._pending, []
    for seq in plan.seqs:
        req = self.requests.get(seq.request_id)
        if req is None or req.status is not RequestStatus.RUNNING:
            continue
        before = req.num_computed_tokens
        req.num_computed_tokens = seq.start_pos + len(seq.token_ids)
        self._cache_new_blocks(req, before, req.num_computed_tokens)
        if not seq.sample:
            continue
        token = sampled[seq.request_id]
        req.output_token_ids.append(token)
        reason = req.check_stop()
        if reason is not None:
            self.running.remove(req)
            self._finish(req, reason)
        elif req.prefill_only:
            self.running.remove(req)
            req.status = RequestStatus.PREFILLED
        else:
            req.ready_step = self._step
        updates.append(self._update(req, (token,)))
    return updates


def _slow_decodes(self: SplitwiseBatching) -> StepPlan:
    """SplitwiseBatching.schedule with `_grow_or_preempt` called for every decode."""
    budget = self.max_num_batched_tokens
    seqs: list[ScheduledSeq] = []
    preempted: list[str] = []
    used = 0
    taken: set[str] = set()
    while self.waiting and len(seqs) < self.max_num_seqs:
        req = self.waiting[0]
        n = req.num_tokens
        if seqs and used + n > budget:
            break
        if self._blocks_for(n) > self.pool.num_blocks:
            self.waiting.popleft()
            self._finish(req, "length")
            self._pending.append(self._update(req, ()))
            continue
        blocks = self.pool.allocate(self._blocks_for(n))
        if blocks is None:
            break
        self.waiting.popleft()
        req.block_ids = blocks
        req.num_computed_tokens = 0
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = 0
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        seqs.append(self._seq(req, n))
        taken.add(req.request_id)
        used += n
    for req in list(self.running):
        if len(seqs) >= self.max_num_seqs or used >= budget:
            break
        if req.request_id in taken or req.status is not RequestStatus.RUNNING:
            continue
        if not self._grow_or_preempt(req, taken, preempted):
            continue
        n = req.num_tokens - req.num_computed_tokens
        seqs.append(self._seq(req, n))
        taken.add(req.request_id)
        used += n
    self._last_batched = used
    self._step += 1
    return StepPlan(tuple(seqs), tuple(preempted), used)


def _use_slow_path(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Scheduler, "_seq", _slow_seq)
    mp.setattr(Scheduler, "_update", staticmethod(_slow_update_of))
    mp.setattr(Scheduler, "update", _slow_update)
    mp.setattr(SplitwiseBatching, "schedule", _slow_decodes)


# ---- random scenarios ---------------------------------------------------------------------------


def _trace(seed: int, n: int) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(40.0)
        # Long outputs (conversation-like) next to one-token answers and long prompts.
        out_tokens = rng.choice([1, rng.randint(2, 40), rng.randint(100, 400)])
        out.append(TraceRequest(f"r{i}", t, rng.randint(1, 900), out_tokens))
    return out


def _sim(batching: str, mixed_pool: bool, kv_tokens: int) -> Simulator:
    design = Design(
        "t", (PoolSpec("prefill", "prefill", "m", 2), PoolSpec("decode", "decode", "m", 2))
    )
    sched = SchedulerConfig(
        conditional_disaggregation=batching == "engine",
        mixed_pool=MixedPoolConfig(
            mixed_pool, borrow_prefill_tokens=2000, return_prefill_tokens=500, cooldown_s=0.0
        ),
    )
    limits = EngineLimits(
        block_size=16,
        max_num_batched_tokens=512,
        max_num_seqs=24,
        batching=batching,  # type: ignore[arg-type]
    )
    machine = dataclasses.replace(TOY_MACHINE, kv_capacity_tokens=kv_tokens)
    perf = {"m": ConstantPerfModel(0.02, 0.005)}
    return Simulator(design, TOY, {"m": machine}, perf, SimConfig(sched, limits))


def _records(seed: int, batching: str, mixed_pool: bool) -> list[tuple]:  # type: ignore[type-arg]
    kv = [1500, 4000, 20000][seed % 3]  # small pools: preemption
    res = _sim(batching, mixed_pool, kv).run(_trace(seed, 150))
    return [dataclasses.astuple(r) for r in res.records] + [
        (res.end_s, res.num_events, len(res.role_changes), sorted(res.busy_s.items()))
    ]


@pytest.mark.parametrize("batching", ["splitwise", "engine"])
@pytest.mark.parametrize("mixed_pool", [False, True])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_decode_shortcuts_match_the_general_code(
    seed: int, batching: str, mixed_pool: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _records(seed, batching, mixed_pool)
    with monkeypatch.context() as mp:
        _use_slow_path(mp)
        slow = _records(seed, batching, mixed_pool)
    assert fast == slow

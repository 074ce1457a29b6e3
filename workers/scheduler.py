"""Machine-level scheduler: continuous batching, FCFS, chunked prefill, preemption by recompute.

With a `RegroupConfig` (MoE models) at most `batch_size` single-token (decode) requests run per
step, picked by `regroup.select_batch` so they share forecast experts; the rest wait, never longer
than the bound allows.

Plain Python, no torch and no model details: the cluster simulator drives this very code. Each
step, `schedule()` returns a `StepPlan` (which requests run, how many new tokens each, their block
tables); the engine runs it and hands back a `StepResult` (the sampled tokens) to `update()`.

Async scheduling (vLLM's): the engine calls `advance(plan)` as soon as it has started a plan, then
schedules the next step before the last one's tokens are back. A request whose token is pending
decodes it in the next step as PENDING_TOKEN, which the engine replaces with the sampled token when
that step runs; `update(plan, result, advanced=True)` later appends the tokens and ends requests.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from batonserve.workers.block_pool import BlockPool, hash_blocks
from batonserve.workers.regroup import ExpertPath, RegroupConfig, WaitingToken, select
from batonserve.workers.request import Request, RequestStatus

if TYPE_CHECKING:  # annotation only: the scheduler itself stays torch-free
    from batonserve.workers.expert_store.types import ExpertStoreStats


PENDING_TOKEN = -1  # a token id not known when the step was planned (async scheduling)


@dataclass(frozen=True, slots=True)  # one per token per step: no __dict__
class ScheduledSeq:
    """One request's share of a step: new tokens at positions [start_pos, start_pos + len)."""

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_ids: tuple[int, ...]  # the whole block table, covering start_pos + len(token_ids)
    sample: bool  # True when this step reaches the end of the known tokens (logits wanted)


@dataclass(frozen=True)
class StepPlan:
    """What one engine step computes."""

    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to run."""
        return not self.seqs


@dataclass(frozen=True, slots=True)  # one per token per step: no __dict__
class SampledToken:
    """The token sampled for one request in a step."""

    request_id: str
    token_id: int


@dataclass(frozen=True)
class StepResult:
    """What the engine hands back after running a plan."""

    sampled: tuple[SampledToken, ...]


@dataclass(frozen=True, slots=True)  # one per token per step: no __dict__
class RequestUpdate:
    """One request's progress after a step (new token, end, or prefill done)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None
    prefilled: bool  # prefill_only request whose KV is now pinned
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


@dataclass(frozen=True)
class SchedulerStats:
    """Load and cache figures, for metrics and for cluster-level scheduling."""

    num_running: int
    num_waiting: int
    num_pinned: int  # prefilled or importing requests holding blocks
    kv_usage: float  # 0..1
    prefix_queries: int  # cumulative tokens looked up
    prefix_hits: int  # cumulative tokens found cached
    num_batched_tokens: int  # in the last plan
    num_preemptions: int  # cumulative
    pending_prefill_tokens: int  # prompt tokens not yet computed
    regroup_deferred: int = 0  # cumulative decode tokens held back a step by token regrouping
    regroup_max_wait: int = 0  # most steps any regrouped token has waited
    moe: ExpertStoreStats | None = None  # the expert store's totals (set by the engine core)


class Scheduler:
    """Decides, step by step, which requests compute which tokens within the token budget."""

    def __init__(
        self,
        pool: BlockPool,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        regroup: RegroupConfig | None = None,
        expert_path: Callable[[int], ExpertPath] | None = None,
    ) -> None:
        """`expert_path(token_id)`: the forecast experts of a token (needed with `regroup`)."""
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if regroup is not None and expert_path is None:
            raise ValueError("regroup: token regrouping needs an expert_path forecaster")
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._pending: list[RequestUpdate] = []  # ends noticed outside a step
        self._arrivals = 0
        self._preemptions = 0
        self._last_batched = 0
        self.regroup = regroup
        self.expert_path = expert_path
        self._step = 0
        self._regroup_deferred = 0
        self.regroup_waits: Counter[int] = Counter()  # steps a decode token waited -> tokens
        # Each running request's block table as last planned, kept while the list is the same
        # object and length (tables only grow in place): no copy at every decode step.
        self._tables: dict[str, tuple[list[int], tuple[int, ...]]] = {}

    # ---- requests in and out ---------------------------------------------------------------

    def add(self, req: Request) -> None:
        """Queue a new request (FCFS)."""
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        req.arrival = self._arrivals
        self._arrivals += 1
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is and free its blocks; False if unknown (idempotent)."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        self._finish(req, "abort")
        return True

    def release(self, request_id: str) -> bool:
        """Free a prefilled (pinned) request's blocks after its KV was handed off."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status is not RequestStatus.PREFILLED:
            raise ValueError(f"request_id {request_id!r} is {req.status.value}, not prefilled")
        self._finish(req, req.finish_reason)
        return True

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running (pinned ones do not count)."""
        return bool(self.waiting or self.running or self._pending)

    def import_request(self, req: Request) -> list[int]:
        """Hold blocks for a request whose prompt KV will be written from outside.

        `req.output_token_ids` holds the first token (sampled by the prefill engine); the prompt
        positions count as computed once `commit_import` is called.
        """
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        blocks = self.pool.allocate(self._blocks_for(req.num_prompt_tokens))
        if blocks is None:
            raise RuntimeError(
                f"not enough free KV blocks to import {req.request_id!r} "
                f"({req.num_prompt_tokens} tokens, {self.pool.num_free_blocks} blocks free)"
            )
        req.arrival = self._arrivals
        self._arrivals += 1
        req.block_ids = blocks
        req.status = RequestStatus.IMPORTING
        req.num_cached_tokens = 0
        self.requests[req.request_id] = req
        return blocks

    def commit_import(self, request_id: str) -> None:
        """All layers of an imported request arrived: decode it as if it prefilled here."""
        req = self.requests.get(request_id)
        if req is None or req.status is not RequestStatus.IMPORTING:
            raise ValueError(f"request_id {request_id!r} is not being imported")
        req.num_computed_tokens = req.num_prompt_tokens
        self._cache_new_blocks(req, 0, req.num_prompt_tokens)
        reason = req.check_stop()
        if reason is not None:
            self._finish(req, reason)
            self._pending.append(self._update(req, ()))
            return
        req.status = RequestStatus.RUNNING
        req.ready_step = self._step
        self.running.append(req)

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Pick this step's work: running requests first, then waiting ones in arrival order."""
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []
        held = self._regroup_held()
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.request_id in held:
                i += 1
                continue
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if req.num_pending and not self._may_run_ahead(req):
                i += 1  # its pending token may end it: wait for the token first
                continue
            assert n > 0, "a running request always has a token to compute"
            if self._blocks_for(req.num_computed_tokens + n) > self.pool.num_blocks:
                # Even alone it cannot grow: stop it rather than preempt forever.
                self.running.pop(i)
                self._finish(req, "length")
                self._pending.append(self._update(req, ()))
                continue
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running.pop()  # the latest admitted goes back to waiting
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                seqs.append(self._seq(req, n))
                budget -= n
                i += 1
        if not preempted:
            budget = self._admit(budget, seqs)
        self._last_batched = self.max_num_batched_tokens - budget
        self._step += 1
        return StepPlan(tuple(seqs), tuple(preempted), self._last_batched)

    def advance(self, plan: StepPlan) -> None:
        """A plan has started (async scheduling): count its tokens as computed and its sampled
        tokens as pending, so the next `schedule()` can plan past them."""
        for seq in plan.seqs:
            req = self.requests[seq.request_id]
            req.num_computed_tokens = seq.start_pos + len(seq.token_ids)
            req.num_pending += seq.sample

    def update(
        self, plan: StepPlan, result: StepResult, advanced: bool = False
    ) -> list[RequestUpdate]:
        """Advance computed counts (unless `advance` did), cache full blocks, append sampled
        tokens, end finished ones."""
        sampled = {s.request_id: s.token_id for s in result.sampled}
        updates, self._pending = self._pending, []
        caching = self.pool.enable_caching  # checked once: this loop runs for every token
        for seq in plan.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue  # aborted (or preempted, dropping its pending token) while it ran
            end = seq.start_pos + len(seq.token_ids)
            if not advanced:
                req.num_computed_tokens = end
            if caching:
                self._cache_new_blocks(req, seq.start_pos, end)
            if not seq.sample:
                continue
            req.num_pending -= advanced
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
                req.ready_step = self._step  # its next token can run from the coming step
            updates.append(self._update(req, (token,)))
        return updates

    def stats(self) -> SchedulerStats:
        """Current load and cumulative counters."""
        pc = self.pool.prefix_cache_stats()
        pinned = sum(
            r.status in (RequestStatus.PREFILLED, RequestStatus.IMPORTING)
            for r in self.requests.values()
        )
        pending = sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self.waiting)
        pending += sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self.running)
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_pinned=pinned,
            kv_usage=self.pool.usage,
            prefix_queries=pc.queries,
            prefix_hits=pc.hits,
            num_batched_tokens=self._last_batched,
            num_preemptions=self._preemptions,
            pending_prefill_tokens=pending,
            regroup_deferred=self._regroup_deferred,
            regroup_max_wait=max(self.regroup_waits, default=0),
        )

    # ---- internals -------------------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _regroup_held(self) -> set[str]:
        """Decode requests that sit this step out so the others share experts (empty when off)."""
        if self.regroup is None or self.expert_path is None:
            return set()
        ready = [r for r in self.running if r.num_tokens - r.num_computed_tokens == 1]
        if len(ready) <= self.regroup.batch_size:
            self.regroup_waits.update(self._step - r.ready_step for r in ready)
            return set()
        tokens = [
            WaitingToken(r.request_id, r.ready_step, self.expert_path(r.token_at(r.num_tokens - 1)))
            for r in ready
        ]
        batch = select(tokens, self._step, self.regroup)
        self.regroup_waits.update(self._step - t.ready_step for t in batch)
        held = {r.request_id for r in ready} - {t.request_id for t in batch}
        self._regroup_deferred += len(held)
        return held

    def _may_run_ahead(self, req: Request) -> bool:
        """Whether to plan past a request's pending tokens: not when one of them may end it by
        length (a wasted step), nor for a prefill-only request (it stops at its first token)."""
        if req.prefill_only or self.regroup is not None:
            return False
        grown = len(req.output_token_ids) + req.num_pending
        if grown >= req.params.max_tokens:
            return False
        return not req.max_model_len or req.num_prompt_tokens + grown < req.max_model_len

    def _admit(self, budget: int, seqs: list[ScheduledSeq]) -> int:
        """Move waiting requests into the batch while budget, seats and blocks allow (FCFS)."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits: list[int] = []
            if self.pool.enable_caching:
                self._ensure_hashes(req, req.num_tokens)
                # At most num_tokens - 1 cached: the last token is recomputed to get logits.
                usable = req.block_hashes[: (req.num_tokens - 1) // self.block_size]
                hits = self.pool.find_cached(usable)
            computed = len(hits) * self.block_size
            n = min(req.num_tokens - computed, budget)
            if self._blocks_for(computed + n) > self.pool.num_blocks:
                self.waiting.popleft()
                self._finish(req, "length")
                self._pending.append(self._update(req, ()))
                continue
            self.pool.touch(hits)  # before allocate, so the hits are not evicted
            new = self.pool.allocate(self._blocks_for(computed + n) - len(hits))
            if new is None:
                self.pool.free(hits)
                break  # FCFS: nobody overtakes the head of the queue
            if self.pool.enable_caching:
                self.pool.record_query(req.num_tokens, computed)
            self.waiting.popleft()
            req.block_ids = hits + new
            req.num_computed_tokens = computed
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(self._seq(req, n))
            budget -= n
        return budget

    def _grow(self, req: Request, num_tokens: int) -> bool:
        """Make req's block table cover num_tokens; False when the pool is out of blocks."""
        need = self._blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        new = self.pool.allocate(need)
        if new is None:
            return False
        req.block_ids.extend(new)
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute later: drop its blocks and queue it first (its tokens so far are kept)."""
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_pending = 0  # a token still being sampled is dropped: recomputed on readmission
        req.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self._preemptions += 1
        self.waiting.appendleft(req)

    def _seq(self, req: Request, n: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        p = len(req.prompt_token_ids)
        out = req.output_token_ids
        if req.num_pending:  # decodes the token a running step is sampling
            assert n == 1, "a request with a pending token decodes one token"
            tokens: tuple[int, ...] = (PENDING_TOKEN,)
        elif n == 1 and start >= p:  # a decode, the common case: skip the general slicing
            tokens = (out[start - p],)
        else:
            tokens = tuple(req.tokens_between(start, start + n))
        ids = req.block_ids
        known = self._tables.get(req.request_id)
        if known is not None and known[0] is ids and len(known[1]) == len(ids):
            table = known[1]
        else:
            table = tuple(ids)
            self._tables[req.request_id] = (ids, table)
        last = p + len(out) + req.num_pending  # tokens known or being sampled
        return ScheduledSeq(req.request_id, tokens, start, table, start + n == last)

    def _ensure_hashes(self, req: Request, num_tokens: int) -> None:
        full = num_tokens // self.block_size
        have = len(req.block_hashes)
        if have < full:
            parent = req.block_hashes[-1] if have else 0
            toks = req.tokens_between(0, full * self.block_size)
            req.block_hashes.extend(hash_blocks(toks, self.block_size, have, parent))

    def _cache_new_blocks(self, req: Request, before: int, after: int) -> None:
        """Name the blocks that became full and computed between `before` and `after` tokens."""
        if not self.pool.enable_caching:
            return
        lo, hi = before // self.block_size, after // self.block_size
        if hi <= lo:
            return
        self._ensure_hashes(req, after)
        for b in range(lo, hi):
            self.pool.cache_block(req.block_ids[b], req.block_hashes[b])

    def _finish(self, req: Request, reason: str | None) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = []
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self.requests[req.request_id]
        self._tables.pop(req.request_id, None)

    @staticmethod
    def _update(req: Request, new: tuple[int, ...]) -> RequestUpdate:
        # Positional and without the properties: it runs for every token of every request.
        status = req.status
        cached = req.num_cached_tokens
        return RequestUpdate(
            req.request_id,
            new,
            status is RequestStatus.FINISHED,
            req.finish_reason,
            status is RequestStatus.PREFILLED,
            len(req.prompt_token_ids),
            len(req.output_token_ids),
            cached if cached > 0 else 0,
        )

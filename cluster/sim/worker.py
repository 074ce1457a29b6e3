"""One simulated worker: the engine's own machine-level scheduler and block pool, timed by a model.

By default no batching rule is re-implemented here: `batonserve.workers.scheduler.Scheduler`
decides every step (FCFS, chunked prefill under the token budget, the running-request cap,
preemption), exactly as in a live engine; only the step's duration comes from a performance
model. The paper-faithful setting swaps in Splitwise's own batching rule (`paper_batching`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal, cast, get_args

from batonserve.cluster.scheduling import Role, WorkerView
from batonserve.cluster.sim.count_pool import CountingBlockPool
from batonserve.cluster.sim.hardware import MachineSpec
from batonserve.cluster.sim.perf_model import PerfModel
from batonserve.cluster.worker_stats import worker_view
from batonserve.workers.block_pool import BlockPool
from batonserve.workers.config import EngineConfig
from batonserve.workers.request import Request
from batonserve.workers.scheduler import (
    RequestUpdate,
    SampledToken,
    Scheduler,
    StepPlan,
    StepResult,
)

SIM_TOKEN = 1  # every sampled token; requests run with ignore_eos, so only max_tokens ends them


_ENGINE = EngineConfig()

Batching = Literal["engine", "splitwise"]


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings that shape batching (EngineConfig's names and defaults).

    `batching`: "engine" runs batonserve's own machine-level scheduler (chunked prefill);
    "splitwise" runs the paper's rule (`paper_batching.SplitwiseBatching`: whole prompts first,
    then decodes, within the token budget) for paper-faithful comparisons.
    """

    block_size: int = _ENGINE.block_size
    max_num_batched_tokens: int = _ENGINE.max_num_batched_tokens
    max_num_seqs: int = _ENGINE.max_num_seqs
    # Off by default: trace requests carry lengths, not tokens, so nothing could be shared.
    enable_prefix_caching: bool = False
    batching: Batching = "engine"

    def __post_init__(self) -> None:
        if self.batching not in get_args(Batching):
            raise ValueError(f"batching: one of {list(get_args(Batching))}, got {self.batching!r}")
        if self.batching == "splitwise" and self.enable_prefix_caching:
            raise ValueError("batching 'splitwise' has no prefix caching (the paper has none)")

    @classmethod
    def from_engine_config(cls, cfg: EngineConfig) -> EngineLimits:
        """The limits a worker built from `cfg` runs with."""
        return cls(
            cfg.block_size, cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.enable_prefix_caching
        )


def make_scheduler(pool: BlockPool, limits: EngineLimits) -> Scheduler:
    """The machine-level scheduler a simulated worker runs: the engine's, or the paper's rule."""
    if limits.batching == "splitwise":
        from batonserve.cluster.sim.paper_batching import SplitwiseBatching

        return SplitwiseBatching(pool, limits.max_num_batched_tokens, limits.max_num_seqs)
    return Scheduler(pool, limits.max_num_batched_tokens, limits.max_num_seqs)


class SimWorker:
    """A worker's batching state plus the simulator's bookkeeping around it.

    Every change the simulator makes goes through this object's methods, so the snapshot the
    cluster-level scheduler reads is rebuilt only after something changed (rebuilding all of
    them at every arrival dominated runs with tens of machines).
    """

    def __init__(
        self,
        worker_id: str,
        pool: str,
        home_role: Role,
        machine: MachineSpec,
        perf: PerfModel,
        num_blocks: int,
        limits: EngineLimits,
    ) -> None:
        self.worker_id = worker_id
        self.pool = pool
        self.home_role: Role = home_role
        self._role: Role = home_role
        self.machine = machine
        self.perf = perf
        # Without prefix caching only block counts matter: the counting pool gives the same
        # decisions and builds in microseconds instead of a second per DGX-sized pool.
        self.blocks = (
            BlockPool(num_blocks, limits.block_size, True)
            if limits.enable_prefix_caching
            else cast(BlockPool, CountingBlockPool(num_blocks, limits.block_size))
        )
        self.sched = make_scheduler(self.blocks, limits)
        self.block_size = limits.block_size
        self.plan: StepPlan | None = None  # the step in flight
        self._reserved_blocks = 0  # promised to handoffs paired here but not yet imported
        self.imports: deque[str] = deque()  # handoffs waiting for free blocks, FCFS
        self._view: WorkerView | None = None  # the last snapshot, until something changes
        self.link_free_at = 0.0  # outgoing KV link busy until then
        self.busy_s = 0.0
        self.num_steps = 0
        self._tokens: dict[str, SampledToken] = {}  # each request's sampled token, reused

    # ---- state the snapshot shows: every change clears the cached view ---------------------

    @property
    def role(self) -> Role:
        """The current role (the mixed pool may lend the worker to the other phase)."""
        return self._role

    @role.setter
    def role(self, role: Role) -> None:
        self._role = role
        self._view = None

    @property
    def reserved_blocks(self) -> int:
        """Blocks promised to handoffs paired here but not yet imported."""
        return self._reserved_blocks

    @reserved_blocks.setter
    def reserved_blocks(self, n: int) -> None:
        self._reserved_blocks = n
        self._view = None

    def add(self, req: Request) -> None:
        """Queue a request on the machine-level scheduler."""
        self.sched.add(req)
        self._view = None

    def queue_import(self, request_id: str) -> None:
        """A handoff waits here for free blocks."""
        self.imports.append(request_id)
        self._view = None

    def start_import(self, req: Request) -> None:
        """Take the head of the import queue: hold blocks for its KV."""
        popped = self.imports.popleft()
        assert popped == req.request_id, "imports start in FCFS order"
        self.sched.import_request(req)
        self._view = None

    def commit_import(self, request_id: str) -> None:
        """All of a handoff's KV arrived: it decodes from the next step."""
        self.sched.commit_import(request_id)
        self._view = None

    def release(self, request_id: str) -> None:
        """The decode side has the KV: free the prefilled request's blocks."""
        self.sched.release(request_id)
        self._view = None

    # ---- queries ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A step is in flight."""
        return self.plan is not None

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks covering `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    @property
    def running(self) -> int:
        """Requests in the batch, plus handoffs waiting here for free blocks (paired here)."""
        return len(self.sched.running) + len(self.imports)

    @property
    def waiting(self) -> int:
        """Requests queued, not yet admitted to the batch."""
        return len(self.sched.waiting)

    @property
    def pending_prefill_tokens(self) -> int:
        """Prompt tokens not yet computed (`Scheduler.stats()`'s figure, without its cache and
        pin counters, which walk every request the worker holds)."""
        pending = 0
        for queue in (self.sched.waiting, self.sched.running):
            for r in queue:
                if r.num_computed_tokens < r.num_prompt_tokens:
                    pending += r.num_prompt_tokens - r.num_computed_tokens
        return pending

    @property
    def num_free_blocks(self) -> int:
        """Free KV blocks less those promised to handoffs, as a live worker reports them."""
        return self.blocks.num_free_blocks - self.reserved_blocks

    @property
    def num_blocks(self) -> int:
        """All KV blocks."""
        return self.blocks.num_blocks

    def view(self) -> WorkerView:
        """The snapshot the cluster-level scheduler sees (built as the live cluster builds it)."""
        if self._view is None:
            self._view = worker_view(
                self.worker_id,
                self.pool,
                self.home_role,
                self.role,
                self,
                machine=self.machine.name,
            )
        return self._view

    # ---- steps -----------------------------------------------------------------------------

    def start_step(self) -> float | None:
        """Plan the next step; its duration, or None when there is nothing to run."""
        assert self.plan is None, "one step at a time"
        self._view = None
        plan = self.sched.schedule()
        if plan.is_empty:
            return None
        prefill_tokens = 0
        decodes = 0
        reqs = self.sched.requests
        for s in plan.seqs:
            # One new token past the prompt is a decode; anything else (prompt chunks, the
            # recompute after a preemption) is prefill work.
            if len(s.token_ids) == 1 and s.start_pos >= len(reqs[s.request_id].prompt_token_ids):
                decodes += 1
            else:
                prefill_tokens += len(s.token_ids)
        self.plan = plan
        dt = self.perf.step_time(prefill_tokens, decodes)
        self.busy_s += dt
        self.num_steps += 1
        return dt

    def finish_step(self) -> list[RequestUpdate]:
        """Apply the step in flight: one sampled token for every sequence that reached its end."""
        plan = self.plan
        assert plan is not None
        self.plan = None
        self._view = None
        # Every token is SIM_TOKEN, so a request's SampledToken is the same object at every step
        # (building one per token was a twentieth of a conversation-trace run).
        tokens = self._tokens
        sampled = []
        for s in plan.seqs:
            if s.sample:
                tok = tokens.get(s.request_id)
                if tok is None:
                    tok = tokens[s.request_id] = SampledToken(s.request_id, SIM_TOKEN)
                sampled.append(tok)
        return self.sched.update(plan, StepResult(tuple(sampled)))

    def flush(self) -> list[RequestUpdate]:
        """Updates the engine produced outside a step (e.g. a request that can never fit)."""
        self._view = None
        return self.sched.update(StepPlan((), (), 0), StepResult(()))

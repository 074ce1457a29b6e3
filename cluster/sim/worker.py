"""One simulated worker: the engine's own machine-level scheduler and block pool, timed by a model.

No batching rule is re-implemented here: `batonserve.workers.scheduler.Scheduler` decides every
step (FCFS, chunked prefill under the token budget, the running-request cap, preemption), exactly
as in a live engine; only the step's duration comes from a performance model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from batonserve.cluster.scheduling import Role, WorkerView
from batonserve.cluster.sim.hardware import MachineSpec
from batonserve.cluster.sim.perf_model import PerfModel
from batonserve.workers.block_pool import BlockPool
from batonserve.workers.config import EngineConfig
from batonserve.workers.scheduler import (
    RequestUpdate,
    SampledToken,
    Scheduler,
    StepPlan,
    StepResult,
)

SIM_TOKEN = 1  # every sampled token; requests run with ignore_eos, so only max_tokens ends them


_ENGINE = EngineConfig()


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings that shape batching (EngineConfig's names and defaults)."""

    block_size: int = _ENGINE.block_size
    max_num_batched_tokens: int = _ENGINE.max_num_batched_tokens
    max_num_seqs: int = _ENGINE.max_num_seqs
    # Off by default: trace requests carry lengths, not tokens, so nothing could be shared.
    enable_prefix_caching: bool = False

    @classmethod
    def from_engine_config(cls, cfg: EngineConfig) -> EngineLimits:
        """The limits a worker built from `cfg` runs with."""
        return cls(
            cfg.block_size, cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.enable_prefix_caching
        )


class SimWorker:
    """A worker's batching state plus the simulator's bookkeeping around it."""

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
        self.role: Role = home_role
        self.machine = machine
        self.perf = perf
        self.blocks = BlockPool(num_blocks, limits.block_size, limits.enable_prefix_caching)
        self.sched = Scheduler(self.blocks, limits.max_num_batched_tokens, limits.max_num_seqs)
        self.block_size = limits.block_size
        self.plan: StepPlan | None = None  # the step in flight
        self.reserved_blocks = 0  # promised to handoffs paired here but not yet imported
        self.imports: deque[str] = deque()  # handoffs waiting for free blocks, FCFS
        self.link_free_at = 0.0  # outgoing KV link busy until then
        self.busy_s = 0.0
        self.num_steps = 0

    @property
    def busy(self) -> bool:
        """A step is in flight."""
        return self.plan is not None

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks covering `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def view(self) -> WorkerView:
        """The snapshot the cluster-level scheduler sees."""
        st = self.sched.stats()
        return WorkerView(
            worker_id=self.worker_id,
            pool=self.pool,
            home_role=self.home_role,
            role=self.role,
            healthy=True,
            pending_prefill_tokens=st.pending_prefill_tokens,
            running=st.num_running + len(self.imports),
            waiting=st.num_waiting,
            num_free_blocks=max(0, self.blocks.num_free_blocks - self.reserved_blocks),
            num_total_blocks=self.blocks.num_blocks,
            block_size=self.block_size,
            machine=self.machine.name,
        )

    def start_step(self) -> float | None:
        """Plan the next step; its duration, or None when there is nothing to run."""
        assert self.plan is None, "one step at a time"
        plan = self.sched.schedule()
        if plan.is_empty:
            return None
        prefill_tokens = 0
        decodes = 0
        for s in plan.seqs:
            req = self.sched.requests[s.request_id]
            # One new token past the prompt is a decode; anything else (prompt chunks, the
            # recompute after a preemption) is prefill work.
            if len(s.token_ids) == 1 and s.start_pos >= req.num_prompt_tokens:
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
        sampled = tuple(SampledToken(s.request_id, SIM_TOKEN) for s in plan.seqs if s.sample)
        return self.sched.update(plan, StepResult(sampled))

    def flush(self) -> list[RequestUpdate]:
        """Updates the engine produced outside a step (e.g. a request that can never fit)."""
        return self.sched.update(StepPlan((), (), 0), StepResult(()))

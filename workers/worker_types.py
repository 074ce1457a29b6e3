"""Typed objects between a worker actor and the cluster: specs in, deltas, events and stats out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from batonserve.workers.config import EngineConfig, Role
from batonserve.workers.expert_store.types import ExpertStoreStats
from batonserve.workers.kv_transfer.config import KVTransferConfig
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig
from batonserve.workers.sp_serving.report import SPStepReport

HandoffEventKind = Literal["committed", "failed"]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker actor needs to build its engine and its KV transport."""

    name: str  # "<pool>-<index>", also the Ray actor name
    pool: str
    role: Role
    model: str  # a resolved model directory, or the name of the scripted engine
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv: KVTransferConfig = field(default_factory=KVTransferConfig)
    namespace: str = "batonserve"
    scripted: ScriptedEngineConfig | None = None  # set: a fake engine with scripted tokens
    tensor_parallel_size: int = 1  # ranks of this worker (workers/tp/serving.py)


@dataclass(frozen=True)
class HandoffSpec:
    """One KV handoff of one request attempt, from `src` (prefill) to `dst` (decode)."""

    handoff_id: int  # unique per attempt: chunks of an aborted attempt can never be taken
    request_id: str  # the worker-level request id (one per attempt)
    src: str
    dst: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams

    @property
    def prompt_len(self) -> int:
        """Tokens whose KV moves."""
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class HandoffEvent:
    """The decode side committed a handoff, or either side saw it fail."""

    handoff_id: int
    request_id: str
    kind: HandoffEventKind
    nbytes: int = 0
    detail: str = ""


@dataclass(frozen=True)
class WorkerStats:
    """One worker's load, as of its latest step."""

    name: str
    pool: str
    role: Role
    healthy: bool
    running: int
    waiting: int
    pinned: int  # prefilled requests waiting for their handoff ack, or imports held
    pending_prefill_tokens: int
    num_free_blocks: int
    num_blocks: int
    block_size: int
    kv_usage: float
    prefix_queries: int
    prefix_hits: int
    steps: int
    exports: int  # outgoing handoffs not yet released
    imports: int  # incoming handoffs not yet committed
    error: str = ""
    preemptions: int = 0  # requests preempted since the worker started (monotonic)
    regroup_deferred: int = 0  # decode tokens token regrouping held back a step (monotonic)
    # Prefix hashes of the blocks this worker caches, refreshed every few hundred ms; the epoch
    # bumps on each refresh (conditional disaggregation sends a cached prompt here).
    cached_block_hashes: tuple[int, ...] = ()
    prefix_epoch: int = 0
    # Recent ring prefills of this worker (sequence parallel), newest last; seq increases.
    sp_reports: tuple[SPStepReport, ...] = ()
    # The expert store's totals (monotonic since the worker started) when it serves MoE experts.
    moe: ExpertStoreStats | None = None
    # The expert-parallel overlap tuner's choices when this worker leads an EP group.
    ep_tuner: EPTunerStats | None = None
    # Handoffs this worker is still working on: queued or prefilling (prefill side), or complete
    # and waiting for free blocks (decode side). The cluster renews their leases while steps run.
    handoffs_in_progress: tuple[int, ...] = ()
    # Tensor parallelism: the worker's ranks and each rank's resident parameter bytes.
    tensor_parallel_size: int = 1
    rank_param_bytes: tuple[int, ...] = ()


@dataclass(frozen=True)
class PollResult:
    """What one long-poll returns: all deltas and events since the previous poll."""

    deltas: tuple[CoreOutput, ...]  # the first token of a handoff comes only from its prefill side
    events: tuple[HandoffEvent, ...]
    stats: WorkerStats
    step_tokens: tuple[int, ...] = ()  # tokens computed by each engine step since the last poll

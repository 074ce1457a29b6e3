"""The real engine as a worker drives it: core steps (token ids out), KV hooks, plan-aware layer hook.

The worker needs token ids only (text and stop strings are made in the router process), and its
KV exporter needs each step's plan (positions and block tables) inside the per-layer hook, so this
adapter drives `Engine.core` directly and remembers the plan the scheduler just made.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.kv_transfer.base import KVSpec
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import SchedulerStats, StepPlan
from batonserve.workers.worker_types import WorkerSpec

PlanHook = Callable[[int, StepPlan], None]


class RealEngine:
    """Engine-shaped facade over `Engine` with the interface the worker and its KV I/O use."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.core = engine.core
        self.scheduler = engine.core.scheduler
        self.pool = engine.core.pool
        self.runner: Any = engine.runner
        self.device = self.runner.device
        mc = engine.model_config
        dtype = str(self.runner.dtype).removeprefix("torch.")
        self.kv_spec = KVSpec(
            model_name, dtype, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.core.block_size
        )
        self.layer_hook: PlanHook | None = None
        self._plan: StepPlan | None = None
        schedule = self.scheduler.schedule

        def capture() -> StepPlan:
            # The core's layer hook names requests only; the exporter needs their positions.
            self._plan = schedule()
            return self._plan

        self.scheduler.schedule = capture  # type: ignore[method-assign]

    def add_request(
        self, request_id: str, prompt: list[int], params: SamplingParams, prefill_only: bool = False
    ) -> None:
        """Validate and queue (the router process detokenizes, so no output processor state)."""
        self.engine.add_request(request_id, prompt, params, prefill_only=prefill_only)
        self.engine.processor.remove(request_id)

    def abort_request(self, request_id: str) -> None:
        """Stop and free; idempotent."""
        self.engine.abort_request(request_id)

    def release(self, request_id: str) -> None:
        """Free a prefilled request's pinned KV."""
        self.engine.release(request_id)

    def has_unfinished(self) -> bool:
        """True while a request waits or runs."""
        return self.engine.has_unfinished()

    def stats(self) -> SchedulerStats:
        """Scheduler figures."""
        return self.engine.stats()

    def step(self) -> list[CoreOutput]:
        """One core step; the layer hook sees this step's plan."""
        hook = None
        if self.layer_hook is not None:
            user = self.layer_hook

            def hook(layer: int, ids: tuple[str, ...]) -> None:
                assert self._plan is not None
                user(layer, self._plan)

        return self.core.step(hook)

    def import_request(
        self, request_id: str, prompt: list[int], first_token_id: int, params: SamplingParams
    ) -> torch.Tensor:
        """Reserve KV for a request prefilled elsewhere; its prompt slots."""
        slots = self.engine.import_request(request_id, prompt, first_token_id, params)
        self.engine.processor.remove(request_id)
        return slots

    def commit_import(self, request_id: str) -> None:
        """All layers written."""
        self.engine.commit_import(request_id)

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) at slots, each [n, num_kv_heads, head_dim]."""
        return self.runner.read_kv(layer, slots)  # type: ignore[no-any-return]

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (k, v) at slots."""
        self.runner.write_kv(layer, slots, k, v)

    def ep_tuner_stats(self) -> EPTunerStats | None:
        """The expert-parallel overlap tuner's choices when this engine leads an EP group."""
        stats = getattr(self.runner, "tuner_stats", None)
        return stats() if stats is not None else None


def build_real_engine(spec: WorkerSpec) -> RealEngine:
    """Load the model directory named by the spec on this worker (leading an EP group if set)."""
    if spec.engine.expert_parallel_size > 1:
        from batonserve.workers.parallel.ep_serving import build_ep_runner

        def factory(model_dir: Path, config: EngineConfig) -> Any:
            return build_ep_runner(model_dir, config, spec.name, spec.namespace)

        engine = Engine(spec.model, spec.engine, runner_factory=factory)
        return RealEngine(engine, model_name=spec.model)
    return RealEngine(Engine(spec.model, spec.engine), model_name=spec.model)

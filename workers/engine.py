"""The offline engine API: `Engine.from_model(dir).generate(prompts, params)` and a step interface.

`Engine` = engine core (scheduler, model runner, sampler) + output processor (tokenizer, stop
strings). A worker holds only the core (`build_core`); its router holds the output processor.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.engine_core import EngineCore, Runner
from batonserve.workers.engine_protocol import LayerHook
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.output_processor import OutputProcessor, merge_outputs
from batonserve.workers.outputs import RequestOutput
from batonserve.workers.regroup import RegroupConfig
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import SchedulerStats
from batonserve.workers.tokenizer import Tokenizer

Prompt = str | Sequence[int]
RunnerFactory = Callable[[Path, EngineConfig], Runner]


def _default_runner(model_dir: Path, config: EngineConfig) -> Runner:
    from batonserve.workers.model_runner import ModelRunner

    runner: Runner = ModelRunner(model_dir, config)
    return runner


def build_core(
    model: str | Path,
    config: EngineConfig,
    runner_factory: RunnerFactory | None = None,
    model_name: str = "",
) -> EngineCore:
    """Load a model directory into an engine core (what a worker holds: no tokenizer)."""
    model_dir = resolve_model_dir(model)
    runner = (runner_factory or _default_runner)(model_dir, config)
    ctx = int(runner.model_config.max_position_embeddings)
    if not 0 <= config.max_model_len <= ctx:
        raise ValueError(
            f"max_model_len: {config.max_model_len} is outside [0, {ctx}] "
            "(0 takes the model's context length)"
        )
    regroup = None
    paths = getattr(runner, "token_paths", None)  # ModelRunner of a MoE model
    if config.moe_regroup_batch:
        if paths is None:
            raise ValueError("moe_regroup_batch: this model runner gives no routing forecasts")
        regroup = RegroupConfig(config.moe_regroup_batch, config.moe_regroup_max_wait)
    return EngineCore(
        runner,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        enable_prefix_caching=config.enable_prefix_caching,
        seed=config.seed,
        regroup=regroup,
        expert_path=paths if regroup else None,
        max_model_len=config.max_model_len,
        model_name=model_name,
        async_scheduling=config.async_scheduling,
    )


class Engine:
    """Offline inference on one model: batch `generate`, or `add_request` + `step` to stream."""

    def __init__(
        self,
        model: str | Path,
        config: EngineConfig | None = None,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.model_dir = resolve_model_dir(model)
        if runner_factory is None and self.config.expert_parallel_size > 1:
            raise ValueError(
                f"expert_parallel_size: {self.config.expert_parallel_size} runs only in a served "
                "cluster, where each worker leads its group (use `batonserve serve`); the "
                "offline Engine needs 1"
            )
        self.core = build_core(self.model_dir, self.config, runner_factory)
        self.runner = self.core.runner
        self.model_config = self.runner.model_config
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = self.core.eos_token_ids
        self.tokenizer = Tokenizer.from_model_dir(self.model_dir)
        self.processor = OutputProcessor(self.tokenizer, self.eos_token_ids)
        self._gen_ids = itertools.count()

    @classmethod
    def from_model(cls, model: str | Path, **overrides: Any) -> Engine:
        """Build with EngineConfig defaults, overriding the given fields (unknown names: error)."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown engine setting (known: {sorted(names)})")
        return cls(model, EngineConfig(**overrides))

    # ---- requests ----------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text through the tokenizer; ids are checked by the core)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer.json; pass token ids instead")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request. prefill_only: stop after the first token and pin the KV (handoff)."""
        params = SamplingParams() if params is None else params
        ids = self.encode(prompt)
        self.core.check(request_id, ids, params)
        self.processor.add_request(request_id, ids, params)
        self.core.add_request(request_id, ids, params, prefill_only=prefill_only)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; idempotent."""
        self.core.abort_request(request_id)
        self.processor.remove(request_id)

    def step(self, layer_hook: LayerHook | None = None) -> list[RequestOutput]:
        """One engine step: the outputs (deltas) of every request that progressed."""
        processed = self.processor.process(self.core.step(layer_hook))
        for request_id in processed.stopped:  # a stop string ended it: free it in the core
            self.core.abort_request(request_id)
        return processed.outputs

    def has_unfinished(self) -> bool:
        """True while any request is waiting or running."""
        return self.core.has_unfinished()

    def stats(self) -> SchedulerStats:
        """Running/waiting counts, KV usage, prefix-cache and preemption counters."""
        return self.core.stats()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; final outputs (whole completions) in input order.

        It drives `step()` itself: outputs of requests added separately are not returned here.
        """
        plist: list[Prompt]
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int)
        ):
            plist = [cast(Prompt, prompts)]  # one prompt (text or token ids)
        else:
            plist = list(cast(Sequence[Prompt], prompts))
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(plist)
        else:
            param_list = list(params)
            if len(param_list) != len(plist):
                raise ValueError(
                    f"params: {len(param_list)} sampling params for {len(plist)} prompts"
                )
        batch = next(self._gen_ids)
        ids = [f"generate-{batch}-{i}" for i in range(len(plist))]
        try:
            for rid, prompt, p in zip(ids, plist, param_list, strict=True):
                self.add_request(rid, prompt, p)
            results: dict[str, RequestOutput] = {}
            pending = set(ids)
            while pending:
                for out in self.step():
                    if out.request_id in pending:
                        results[out.request_id] = merge_outputs(results.get(out.request_id), out)
                        if out.finished:
                            pending.discard(out.request_id)
        except BaseException:
            for rid in ids:
                self.abort_request(rid)
            raise
        return [results[rid] for rid in ids]

    # ---- KV handoff hooks (the cluster moves a prefilled request's KV to another engine) -----

    def kv_slots(self, request_id: str) -> torch.Tensor:
        """int64 slots (block_id * block_size + offset) of the prompt tokens' KV."""
        return self.core.kv_slots(request_id)

    def release(self, request_id: str) -> None:
        """Free a prefilled request's pinned KV once the other side has it; idempotent."""
        self.core.release(request_id)
        self.processor.remove(request_id)

    def import_request(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        first_token_id: int,
        params: SamplingParams,
    ) -> torch.Tensor:
        """Reserve KV for a request prefilled elsewhere; write each layer to the returned slots
        with `core.write_kv`, then call `commit_import`."""
        slots = self.core.import_request(request_id, prompt_ids, first_token_id, params)
        # The first token was emitted by the prefill side: it is context here, not output.
        self.processor.add_request(request_id, [*prompt_ids, int(first_token_id)], params)
        return slots

    def commit_import(self, request_id: str) -> None:
        """All layers written: the request decodes here as if it had prefilled here."""
        self.core.commit_import(request_id)


LLM = Engine

"""The offline engine API: `Engine.from_model(dir).generate(prompts, params)` and a step interface.

`Engine` = engine core (scheduler, model runner, sampler) + output processor (tokenizer, stop
strings). The cluster drives the same step interface, plus the KV handoff hooks below.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.engine_core import EngineCore, LayerHook, Runner
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.output_processor import OutputProcessor, merge_outputs
from batonserve.workers.outputs import RequestOutput
from batonserve.workers.regroup import RegroupConfig
from batonserve.workers.request import Request
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import SchedulerStats
from batonserve.workers.tokenizer import Tokenizer

Prompt = str | Sequence[int]
RunnerFactory = Callable[[Path, EngineConfig], Runner]


def _default_runner(model_dir: Path, config: EngineConfig) -> Runner:
    from batonserve.workers.model_runner import ModelRunner

    runner: Runner = ModelRunner(model_dir, config)
    return runner


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
        self.runner = (runner_factory or _default_runner)(self.model_dir, self.config)
        self.model_config = self.runner.model_config
        ctx = int(self.model_config.max_position_embeddings)
        if not 0 <= self.config.max_model_len <= ctx:
            raise ValueError(
                f"max_model_len: {self.config.max_model_len} is outside [0, {ctx}] "
                "(0 takes the model's context length)"
            )
        self.max_model_len = self.config.max_model_len or ctx
        self.eos_token_ids = tuple(self.model_config.eos_token_ids)
        self.tokenizer = Tokenizer.from_model_dir(self.model_dir)
        regroup = None
        paths = getattr(self.runner, "token_paths", None)  # ModelRunner of a MoE model
        if self.config.moe_regroup_batch:
            if paths is None:
                raise ValueError("moe_regroup_batch: this model runner gives no routing forecasts")
            regroup = RegroupConfig(self.config.moe_regroup_batch, self.config.moe_regroup_max_wait)
        self.core = EngineCore(
            self.runner,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            max_num_seqs=self.config.max_num_seqs,
            enable_prefix_caching=self.config.enable_prefix_caching,
            seed=self.config.seed,
            regroup=regroup,
            expert_path=paths if regroup else None,
        )
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
        """Token ids of a prompt (text through the tokenizer; ids checked against the vocab)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer.json; pass token ids instead")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = int(self.model_config.vocab_size)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def _check(self, request_id: str, ids: list[int], params: Any) -> None:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if request_id in self.core.scheduler.requests or request_id in self.processor:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens leave no room to generate within the model's "
                f"context (max_model_len={self.max_model_len})"
            )
        blocks = -(-(len(ids) + 1) // self.core.block_size)
        if blocks > self.core.pool.num_blocks:
            raise ValueError(
                f"prompt: {len(ids)} tokens need {blocks} KV blocks; the engine has "
                f"{self.core.pool.num_blocks} (raise num_kv_blocks or kv_cache_bytes)"
            )

    def _request(self, request_id: str, ids: list[int], params: SamplingParams) -> Request:
        return Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )

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
        self._check(request_id, ids, params)
        req = self._request(request_id, ids, params)
        req.prefill_only = prefill_only
        self.processor.add_request(request_id, ids, params)
        self.core.add_request(req)

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its KV blocks; idempotent."""
        self.core.abort(request_id)
        self.processor.remove(request_id)

    def step(self, layer_hook: LayerHook | None = None) -> list[RequestOutput]:
        """One engine step: the outputs (deltas) of every request that progressed."""
        processed = self.processor.process(self.core.step(layer_hook))
        for request_id in processed.stopped:  # a stop string ended it: free it in the core
            self.core.abort(request_id)
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
        with `runner.write_kv`, then call `commit_import`."""
        ids = self.encode(list(prompt_ids))
        self._check(request_id, ids, params)
        self.encode([first_token_id])
        req = self._request(request_id, ids, params)
        req.output_token_ids.append(int(first_token_id))
        slots = self.core.import_request(req)
        # The first token was emitted by the prefill side: it is context here, not output.
        self.processor.add_request(request_id, [*ids, int(first_token_id)], params)
        return slots

    def commit_import(self, request_id: str) -> None:
        """All layers written: the request decodes here as if it had prefilled here."""
        self.core.commit_import(request_id)


LLM = Engine

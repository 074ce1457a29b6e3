"""The engine core: scheduler + model runner + sampler, token ids in and token ids out.

In the cluster this runs inside a worker process; text (tokenizer, stop strings) lives in the
output processor on the router side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch

from batonserve.workers.block_pool import BlockPool
from batonserve.workers.forward_batch import ForwardBatch
from batonserve.workers.outputs import CoreOutput, TokenLogprobs
from batonserve.workers.regroup import ExpertPath, RegroupConfig
from batonserve.workers.request import Request, RequestStatus
from batonserve.workers.sampler import Sampler
from batonserve.workers.scheduler import (
    RequestUpdate,
    SampledToken,
    Scheduler,
    SchedulerStats,
    StepPlan,
    StepResult,
)

# Called after each layer's KV is written: (layer index, ids of the requests in the step).
LayerHook = Callable[[int, tuple[str, ...]], None]


class Runner(Protocol):
    """What the engine core needs from a model runner (workers.model_runner.ModelRunner)."""

    model_config: Any
    num_blocks: int
    block_size: int
    device: torch.device

    def execute(
        self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run one forward pass; float32 logits [len(batch.logits_indices), vocab]."""
        ...


def build_forward_batch(plan: StepPlan, block_size: int, device: torch.device) -> ForwardBatch:
    """Flatten a plan into the runner's variable-length batch layout (built on CPU, then moved)."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    cu = [0]
    ctx: list[int] = []
    logits_idx: list[int] = []
    width = max(len(s.block_ids) for s in plan.seqs)
    tables = torch.zeros(len(plan.seqs), width, dtype=torch.int32)
    for i, s in enumerate(plan.seqs):
        n = len(s.token_ids)
        input_ids.extend(s.token_ids)
        pos = range(s.start_pos, s.start_pos + n)
        positions.extend(pos)
        bids = s.block_ids
        slots.extend(bids[p // block_size] * block_size + p % block_size for p in pos)
        cu.append(cu[-1] + n)
        ctx.append(s.start_pos + n)
        if s.sample:
            logits_idx.append(cu[-1] - 1)  # the last new token's row predicts the next token
        tables[i, : len(bids)] = torch.tensor(bids, dtype=torch.int32)

    def put(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return ForwardBatch(
        input_ids=put(input_ids, torch.int64),
        positions=put(positions, torch.int64),
        cu_query_lens=put(cu, torch.int32),
        context_lens=put(ctx, torch.int32),
        block_tables=tables.to(device, non_blocking=True),
        slot_mapping=put(slots, torch.int64),
        logits_indices=put(logits_idx, torch.int64),
        max_query_len=max(len(s.token_ids) for s in plan.seqs),
        max_context_len=max(ctx),
    )


class EngineCore:
    """Steps the scheduler, runs the model and samples; owns the block pool."""

    def __init__(
        self,
        runner: Runner,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        regroup: RegroupConfig | None = None,
        expert_path: Callable[[int], ExpertPath] | None = None,
    ) -> None:
        self.runner = runner
        self.block_size = runner.block_size
        self.vocab_size = int(runner.model_config.vocab_size)
        self.pool = BlockPool(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(
            self.pool, max_num_batched_tokens, max_num_seqs, regroup, expert_path
        )
        self.sampler = Sampler(runner.device, seed)
        self.last_plan: StepPlan | None = None  # the plan of the step running / just run

    def add_request(self, req: Request) -> None:
        """Queue a request (already validated by the caller)."""
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if unknown."""
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        """True while a request is waiting or running."""
        return self.scheduler.has_unfinished()

    def stats(self) -> SchedulerStats:
        """Scheduler and KV-cache figures, plus the expert store's totals when one serves experts."""
        stats = self.scheduler.stats()
        store = getattr(self.runner, "expert_store", None)  # only ModelRunner with a policy has one
        if store is None:
            return stats
        return dataclasses.replace(stats, moe=store.snapshot_stats())

    def step(self, layer_hook: LayerHook | None = None) -> list[CoreOutput]:
        """Schedule, run one forward pass, sample; returns each touched request's progress."""
        plan = self.scheduler.schedule()
        self.last_plan = plan
        if plan.is_empty:
            return self._outputs(self.scheduler.update(plan, StepResult(())), {})
        batch = build_forward_batch(plan, self.block_size, self.runner.device)
        hook = None
        if layer_hook is not None:
            ids = tuple(s.request_id for s in plan.seqs)

            def hook(layer: int) -> None:
                layer_hook(layer, ids)

        logits = self.runner.execute(batch, layer_hook=hook)  # [num_sampled, vocab] float32
        sampled_ids = [s.request_id for s in plan.seqs if s.sample]
        reqs = [self.scheduler.requests[r] for r in sampled_ids]
        # A seeded draw is keyed by the position of the token it makes (prompt + output so far),
        # so a request resumed elsewhere from prompt + tokens sent draws exactly the same.
        out = self.sampler.sample(logits, [r.params for r in reqs], [r.num_tokens for r in reqs])
        result = StepResult(
            tuple(SampledToken(r, t) for r, t in zip(sampled_ids, out.token_ids, strict=True))
        )
        logprobs = dict(zip(sampled_ids, out.logprobs, strict=True))
        return self._outputs(self.scheduler.update(plan, result), logprobs)

    def _outputs(
        self, updates: list[RequestUpdate], logprobs: dict[str, TokenLogprobs | None]
    ) -> list[CoreOutput]:
        outs = []
        for u in updates:
            lp = logprobs.get(u.request_id)
            outs.append(
                CoreOutput(
                    request_id=u.request_id,
                    new_token_ids=u.new_token_ids,
                    logprobs=(lp,) if u.new_token_ids and lp is not None else (),
                    finished=u.finished,
                    finish_reason=u.finish_reason,
                    prefilled=u.prefilled,
                    num_prompt_tokens=u.num_prompt_tokens,
                    num_output_tokens=u.num_output_tokens,
                    num_cached_tokens=u.num_cached_tokens,
                )
            )
        return outs

    # ---- KV handoff (Splitwise): prefill here, decode elsewhere -------------------------

    def slots_of(self, request_id: str, num_tokens: int | None = None) -> torch.Tensor:
        """Slots of a request's first num_tokens positions (default: the prompt). int64 [n]."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            raise ValueError(f"request_id {request_id!r} is unknown")
        n = req.num_prompt_tokens if num_tokens is None else num_tokens
        bs = self.block_size
        blocks = torch.tensor(req.block_ids, dtype=torch.int64)
        pos = torch.arange(n, dtype=torch.int64)
        assert len(req.block_ids) * bs >= n, "request holds too few blocks"
        return blocks[pos // bs] * bs + pos % bs

    def kv_slots(self, request_id: str) -> torch.Tensor:
        """Prompt slots of a prefilled (pinned) or running request."""
        req = self.scheduler.requests.get(request_id)
        if req is None or req.status not in (RequestStatus.PREFILLED, RequestStatus.RUNNING):
            raise ValueError(f"request_id {request_id!r} has no computed KV here")
        if req.num_computed_tokens < req.num_prompt_tokens:
            raise ValueError(f"request_id {request_id!r} has not finished its prefill")
        return self.slots_of(request_id)

    def release(self, request_id: str) -> bool:
        """Free a prefilled request's pinned blocks; False if unknown."""
        return self.scheduler.release(request_id)

    def import_request(self, req: Request) -> torch.Tensor:
        """Reserve blocks for a request prefilled elsewhere; returns its prompt slots."""
        self.scheduler.import_request(req)
        return self.slots_of(req.request_id)

    def commit_import(self, request_id: str) -> None:
        """Every layer has arrived: decode the request from its next token on."""
        self.scheduler.commit_import(request_id)

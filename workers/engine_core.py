"""The engine core: scheduler + model runner + sampler, token ids in and token ids out.

In the cluster this runs inside a worker process and is all the worker holds (it implements
`WorkerEngine`); text (tokenizer, stop strings) lives in the output processor on the router side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from batonserve.workers.block_pool import BlockPool
from batonserve.workers.engine_protocol import LayerHook
from batonserve.workers.forward_batch import ForwardBatch
from batonserve.workers.kv_transfer.base import KVSpec
from batonserve.workers.outputs import CoreOutput, TokenLogprobs
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.regroup import ExpertPath, RegroupConfig
from batonserve.workers.request import Request, RequestStatus
from batonserve.workers.sampler import Sampler, SamplerOutput
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import (
    PENDING_TOKEN,
    RequestUpdate,
    SampledToken,
    Scheduler,
    SchedulerStats,
    StepPlan,
    StepResult,
)

if TYPE_CHECKING:
    from batonserve.workers.parallel import AttentionDims
    from batonserve.workers.sp_serving.forward import SPForward


EMPTY_PLAN = StepPlan((), (), 0)


def fill_rows(plan: StepPlan, last: _Step | None) -> tuple[list[int], list[int]] | None:
    """Where `plan` decodes a token the running step `last` samples: (input rows, indices in
    last's sampled rows), or None when it has none."""
    if last is None:
        return None
    index = {r: i for i, r in enumerate(last.sampled_ids)}
    rows: list[int] = []
    picks: list[int] = []
    row = 0
    for s in plan.seqs:
        if s.token_ids[0] == PENDING_TOKEN:  # a pending token is a decode's only input
            rows.append(row)
            picks.append(index[s.request_id])
        row += len(s.token_ids)
    return (rows, picks) if rows else None


class Runner(Protocol):
    """What the engine core needs from a model runner (workers.model_runner.ModelRunner)."""

    model_config: Any
    num_blocks: int
    block_size: int
    device: torch.device
    dtype: torch.dtype

    def execute(
        self, batch: ForwardBatch, layer_hook: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run one forward pass; float32 logits [len(batch.logits_indices), vocab]."""
        ...

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) at slots, each [n, num_kv_heads, head_dim]."""
        ...

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (k, v) at slots."""
        ...


def build_forward_batch(plan: StepPlan, block_size: int, device: torch.device) -> ForwardBatch:
    """Flatten a plan into the runner's variable-length batch layout (built on CPU, then moved).
    A PENDING_TOKEN input (async scheduling) stays -1 here: `fill_rows` says where, and the step
    thread fills in the sampled token."""
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


@dataclass
class _Step:
    """A plan the model is running on the step thread (async scheduling)."""

    plan: StepPlan
    sampled_ids: list[str]  # the requests it samples, in its logits' row order
    done: Future[SamplerOutput]


class EngineCore:
    """Steps the scheduler, runs the model and samples; owns the block pool (a `WorkerEngine`).

    With `async_scheduling`, `step()` starts the model on the next plan (one step thread) before
    it settles the previous one: scheduling, the scheduler's update and the caller's output
    processing overlap the forward. Each call returns the previous step's outputs. A step with a
    layer hook, and anything else that runs the model, first waits for the running step.
    """

    def __init__(
        self,
        runner: Runner,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 64,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        regroup: RegroupConfig | None = None,
        expert_path: Callable[[int], ExpertPath] | None = None,
        max_model_len: int = 0,
        model_name: str = "",
        async_scheduling: bool = False,
    ) -> None:
        self.runner = runner
        self.device = runner.device
        self.block_size = runner.block_size
        mc = runner.model_config
        self.vocab_size = int(mc.vocab_size)
        self.max_model_len = max_model_len or int(mc.max_position_embeddings)
        self.eos_token_ids = tuple(mc.eos_token_ids)
        self.model_name = model_name
        self.pool = BlockPool(runner.num_blocks, runner.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(
            self.pool, max_num_batched_tokens, max_num_seqs, regroup, expert_path
        )
        self.sampler = Sampler(runner.device, seed)
        # Token regrouping forecasts experts from each decode's input token: it needs them known.
        self._thread = (
            ThreadPoolExecutor(1, thread_name_prefix="engine-step")
            if async_scheduling and regroup is None
            else None
        )
        self._running: _Step | None = None
        self._settled: list[CoreOutput] = []  # outputs of a step settled outside step()

    @property
    def kv_spec(self) -> KVSpec:
        """What must match a peer engine's for KV handoff."""
        mc = self.runner.model_config
        dtype = str(self.runner.dtype).removeprefix("torch.")
        return KVSpec(
            self.model_name, dtype, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.block_size
        )

    # ---- requests ----------------------------------------------------------------------------

    def check(self, request_id: str, prompt_token_ids: Sequence[int], params: object) -> None:
        """Raise ValueError naming what is wrong with a new request; nothing changes here."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
            )
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(prompt_token_ids)} tokens leave no room to generate within the "
                f"model's context (max_model_len={self.max_model_len})"
            )
        blocks = -(-(len(prompt_token_ids) + 1) // self.block_size)
        if blocks > self.pool.num_blocks:
            raise ValueError(
                f"prompt: {len(prompt_token_ids)} tokens need {blocks} KV blocks; the engine has "
                f"{self.pool.num_blocks} (raise num_kv_blocks or kv_cache_bytes)"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Check and queue a request; prefill_only pins its KV after the first token."""
        ids = [int(t) for t in prompt_token_ids]
        self.check(request_id, ids, params)
        self._settle_if_running(request_id)
        req = self._request(request_id, ids, params)
        req.prefill_only = prefill_only
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> bool:
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

    def ep_tuner_stats(self) -> EPTunerStats | None:
        """The expert-parallel overlap tuner's choices when this engine leads an EP group."""
        stats = getattr(self.runner, "tuner_stats", None)  # only the EP runner has a tuner
        return stats() if stats is not None else None  # type: ignore[no-any-return]

    def step(self, layer_hook: LayerHook | None = None) -> list[CoreOutput]:
        """Schedule, run one forward pass, sample; returns each touched request's progress
        (with async scheduling: the previous step's, while this one runs)."""
        if self._thread is None or layer_hook is not None:
            self.settle()
            return self._take_settled() + self._step_now(layer_hook)
        last, self._running = self._running, None
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            batch = build_forward_batch(plan, self.block_size, self.runner.device)
            sampled_ids, params, positions = self._sampling_rows(plan)
            pending = fill_rows(plan, last)
            done = self._thread.submit(self._run, batch, params, positions, pending, last)
            self.scheduler.advance(plan)
            self._running = _Step(plan, sampled_ids, done)
        if last is None:  # only the ends noticed while scheduling
            return self._take_settled() + self._outputs(
                self.scheduler.update(EMPTY_PLAN, StepResult(())), {}
            )
        return self._take_settled() + self._settle(last)

    def _step_now(self, layer_hook: LayerHook | None) -> list[CoreOutput]:
        """One step in lockstep: schedule, run, sample, update."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return self._outputs(self.scheduler.update(plan, StepResult(())), {})
        batch = build_forward_batch(plan, self.block_size, self.runner.device)
        hook = None
        if layer_hook is not None:

            def hook(layer: int) -> None:
                layer_hook(layer, plan)

        sampled_ids, params, positions = self._sampling_rows(plan)
        out = self._run(batch, params, positions, None, None, hook)
        return self._outputs(*self._result(plan, sampled_ids, out, advanced=False))

    def _sampling_rows(self, plan: StepPlan) -> tuple[list[str], list[SamplingParams], list[int]]:
        """The plan's sampled requests in logits-row order, their params, and the position of
        the token each draws: a seeded draw is keyed by it, so a request resumed elsewhere from
        prompt + tokens sent draws exactly the same."""
        ids = [s.request_id for s in plan.seqs if s.sample]
        reqs = self.scheduler.requests
        params = [reqs[r].params for r in ids]
        positions = [s.start_pos + len(s.token_ids) for s in plan.seqs if s.sample]
        return ids, params, positions

    def _run(
        self,
        batch: ForwardBatch,
        params: list[SamplingParams],
        positions: list[int],
        pending: tuple[list[int], list[int]] | None,
        last: _Step | None,
        hook: Callable[[int], None] | None = None,
    ) -> SamplerOutput:
        """Forward and sample (on the step thread with async scheduling). `pending`: input rows
        whose token the previous step (`last`, finished by now: one step thread) sampled."""
        if pending is not None and last is not None:
            rows, picks = pending
            tokens = last.done.result().token_ids
            batch.input_ids[torch.tensor(rows)] = torch.tensor(
                [tokens[i] for i in picks], dtype=batch.input_ids.dtype
            ).to(batch.input_ids.device)
        logits = self.runner.execute(batch, layer_hook=hook)  # [num_sampled, vocab] float32
        return self.sampler.sample(logits, params, positions)

    def _result(
        self, plan: StepPlan, sampled_ids: list[str], out: SamplerOutput, advanced: bool
    ) -> tuple[list[RequestUpdate], dict[str, TokenLogprobs | None]]:
        result = StepResult(
            tuple(SampledToken(r, t) for r, t in zip(sampled_ids, out.token_ids, strict=True))
        )
        logprobs = dict(zip(sampled_ids, out.logprobs, strict=True))
        return self.scheduler.update(plan, result, advanced=advanced), logprobs

    def _settle(self, step: _Step) -> list[CoreOutput]:
        """Wait for a running step's tokens and apply them (async scheduling)."""
        return self._outputs(*self._result(step.plan, step.sampled_ids, step.done.result(), True))

    def settle(self) -> None:
        """Wait for the running step (async scheduling) and apply its tokens; its outputs come
        with the next `step()`. Call before running the model or reading its KV outside a step."""
        step, self._running = self._running, None
        if step is not None:
            self._settled += self._settle(step)

    def _settle_if_running(self, request_id: str) -> None:
        """A new request reusing the id of one in the running step: settle that step first, so
        its token does not land on the newcomer."""
        step = self._running
        if step is not None and any(s.request_id == request_id for s in step.plan.seqs):
            self.settle()

    def _take_settled(self) -> list[CoreOutput]:
        out, self._settled = self._settled, []
        return out

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

    def _request(self, request_id: str, ids: list[int], params: SamplingParams) -> Request:
        return Request(
            request_id=request_id,
            prompt_token_ids=ids,
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )

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

    def import_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_token_id: int,
        params: SamplingParams,
    ) -> torch.Tensor:
        """Reserve blocks for a request prefilled elsewhere; returns its prompt slots."""
        ids = [int(t) for t in prompt_token_ids]
        self.check(request_id, ids, params)
        if not 0 <= first_token_id < self.vocab_size:
            raise ValueError(
                f"first token id {first_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        self._settle_if_running(request_id)
        req = self._request(request_id, ids, params)
        req.output_token_ids.append(int(first_token_id))  # context here, not output
        self.scheduler.import_request(req)
        return self.slots_of(request_id)

    def commit_import(self, request_id: str) -> None:
        """Every layer has arrived: decode the request from its next token on."""
        self.scheduler.commit_import(request_id)

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) at slots, each [n, num_kv_heads, head_dim]."""
        return self.runner.read_kv(layer, slots)

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (k, v) at slots."""
        self.runner.write_kv(layer, slots, k, v)

    # ---- ring prefill (sequence parallel): one rank's rows of a long prompt ------------------

    def has_sliding_window(self) -> bool:
        """True when some layer attends over a window (ring prefill refuses such models)."""
        mc = self.runner.model_config
        return any(mc.layer_window(i) is not None for i in range(mc.num_layers))

    def attention_dims(self) -> AttentionDims:
        """The model's head geometry, for a ring member's sequence-parallel attention plan."""
        from batonserve.workers.sp_serving.forward import attention_dims

        return attention_dims(self.runner)

    def hold_rows(self, hold_id: str, token_ids: Sequence[int]) -> torch.Tensor | None:
        """Reserve blocks, through the scheduler, for KV rows computed outside a step (a ring
        shard); int64 [len(token_ids)] slots, or None when no blocks are free. Freed by
        `abort_request(hold_id)`; counted as pinned in the stats meanwhile."""
        self._settle_if_running(hold_id)
        req = self._request(hold_id, [int(t) for t in token_ids], SamplingParams())
        try:
            self.scheduler.import_request(req)
        except RuntimeError:
            return None
        return self.slots_of(hold_id)

    def run_shard(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        sp: SPForward,
        logits_rows: torch.Tensor,
        layer_hook: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """This rank's rows of a ring prefill through the model; float32 [len(logits_rows), V]."""
        from batonserve.workers.sp_serving.forward import sp_prefill_forward

        self.settle()  # one forward at a time
        return sp_prefill_forward(
            self.runner, token_ids, positions, slots, sp, logits_rows, layer_hook
        )

    def sample_first(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        logits: torch.Tensor,
    ) -> CoreOutput:
        """A ring prefill's first token (with its logprobs) from the last row's logits [1, vocab];
        finished when it already ends the request (stop token, EOS, max_tokens)."""
        n = len(prompt_token_ids)
        self.settle()  # the sampler's generator is the step thread's meanwhile
        out = self.sampler.sample(logits, [params], [n])
        tok, lp = int(out.token_ids[0]), out.logprobs[0]
        req = self._request(request_id, [int(t) for t in prompt_token_ids], params)
        req.output_token_ids.append(tok)
        reason = req.check_stop()
        return CoreOutput(
            request_id=request_id,
            new_token_ids=(tok,),
            logprobs=(lp,) if lp is not None else (),
            finished=reason is not None,
            finish_reason=reason,
            prefilled=True,
            num_prompt_tokens=n,
            num_output_tokens=1,
            num_cached_tokens=0,
        )

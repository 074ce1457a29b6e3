"""A fake engine with scripted tokens: the real scheduler and block pool, no model math.

Each layer "computes" KV as a function of the token and its position and writes it into a paged
cache; the next token is a hash of what the *cache* holds for the whole sequence. So a decode
worker that imported wrong, partial or stale KV samples different tokens: cluster tests of
pairing, handoff and recovery check real data movement, only cheaper than a model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from batonserve.workers.block_pool import BlockPool
from batonserve.workers.engine_protocol import LayerHook
from batonserve.workers.kv_transfer.base import KVSpec
from batonserve.workers.outputs import CoreOutput, TokenLogprobs
from batonserve.workers.parallel.ep_tuner import EPTunerStats
from batonserve.workers.request import Request
from batonserve.workers.sampler import Sampler
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import (
    SampledToken,
    Scheduler,
    SchedulerStats,
    StepPlan,
    StepResult,
)


@dataclass(frozen=True)
class ScriptedEngineConfig:
    """Shape and pace of the fake engine."""

    num_layers: int = 2
    num_kv_heads: int = 1
    head_dim: int = 2
    block_size: int = 4
    num_blocks: int = 256
    vocab_size: int = 97
    eos_token_id: int = 1
    max_num_batched_tokens: int = 64
    max_num_seqs: int = 64
    enable_prefix_caching: bool = True
    layer_delay_s: float = 0.0  # sleep per layer and step, to make steps observable in tests
    # Sleep per prompt token a step computes: as on a real engine, a prefill takes time in
    # proportion to its length (decode tokens do not pay it), so a prompt backlog lasts.
    prompt_token_delay_s: float = 0.0


class ScriptedEngine:
    """A `WorkerEngine` with scripted tokens: add/abort/step/release and the KV handoff hooks."""

    def __init__(self, cfg: ScriptedEngineConfig, name: str = "scripted") -> None:
        self.cfg = cfg
        self.pool = BlockPool(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        self.kv_spec = KVSpec(
            name, "float32", cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.block_size
        )
        # [num_layers, num_slots, 2, num_kv_heads, head_dim]: slot = block_id * block_size + offset
        self.cache = torch.zeros(
            cfg.num_layers, cfg.num_blocks * cfg.block_size, 2, cfg.num_kv_heads, cfg.head_dim
        )
        self.device = torch.device("cpu")
        self.sampler = Sampler()  # seeded rows draw from (seed, position): exact across a resume

    # ---- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request; prefill_only pins its KV after the first token until release()."""
        req = self._request(request_id, list(prompt_token_ids), params, prefill_only)
        self.scheduler.add(req)

    def abort_request(self, request_id: str) -> bool:
        """End a request anywhere and free its blocks; False if unknown."""
        return self.scheduler.abort(request_id)

    def release(self, request_id: str) -> bool:
        """Free a prefilled request's pinned blocks (its KV was handed off)."""
        return self.scheduler.release(request_id)

    def has_unfinished(self) -> bool:
        """True while any request waits or runs."""
        return self.scheduler.has_unfinished()

    def stats(self) -> SchedulerStats:
        """Scheduler figures."""
        return self.scheduler.stats()

    def ep_tuner_stats(self) -> EPTunerStats | None:
        """None: the fake leads no expert-parallel group."""
        return None

    # ---- KV handoff hooks ------------------------------------------------------------------

    def kv_slots(self, request_id: str) -> torch.Tensor:
        """int64 cache slots of the request's computed tokens, by position."""
        req = self.scheduler.requests[request_id]
        return torch.tensor(self.slots(req.block_ids, 0, req.num_computed_tokens))

    def slots(self, block_ids: tuple[int, ...] | list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end) under a block table."""
        bs = self.cfg.block_size
        return [block_ids[p // bs] * bs + p % bs for p in range(start, end)]

    def import_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        first_token_id: int,
        params: SamplingParams,
    ) -> torch.Tensor:
        """Hold blocks for KV written from outside; int64 slots of the prompt, by position."""
        req = self._request(request_id, list(prompt_token_ids), params, False)
        req.output_token_ids.append(first_token_id)
        blocks = self.scheduler.import_request(req)
        return torch.tensor(self.slots(blocks, 0, len(prompt_token_ids)))

    def commit_import(self, request_id: str) -> None:
        """All layers written: decode from here."""
        self.scheduler.commit_import(request_id)

    def read_kv(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each [len(slots), num_kv_heads, head_dim]."""
        kv = self.cache[layer, torch.as_tensor(slots, dtype=torch.long)]
        return kv[:, 0].clone(), kv[:, 1].clone()

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write (k, v), each [len(slots), num_kv_heads, head_dim]."""
        idx = torch.as_tensor(slots, dtype=torch.long)
        self.cache[layer, idx, 0] = k
        self.cache[layer, idx, 1] = v

    # ---- one step --------------------------------------------------------------------------

    def step(self, layer_hook: LayerHook | None = None) -> list[CoreOutput]:
        """Schedule, write every layer's KV (calling the layer hook), sample, update."""
        plan = self.scheduler.schedule()
        if self.cfg.prompt_token_delay_s:
            time.sleep(self.cfg.prompt_token_delay_s * self._prompt_tokens(plan))
        for layer in range(self.cfg.num_layers):
            for seq in plan.seqs:
                n = len(seq.token_ids)
                idx = torch.tensor(self.slots(seq.block_ids, seq.start_pos, seq.start_pos + n))
                pos = torch.arange(seq.start_pos, seq.start_pos + n, dtype=torch.float32)
                toks = torch.tensor(seq.token_ids, dtype=torch.float32)
                self.cache[layer, idx, 0] = (toks + 1000.0 * layer)[:, None, None]
                self.cache[layer, idx, 1] = pos[:, None, None]
            if self.cfg.layer_delay_s:
                time.sleep(self.cfg.layer_delay_s)
            if layer_hook is not None:
                layer_hook(layer, plan)
        sampled = []
        lps: dict[str, TokenLogprobs | None] = {}
        for seq in plan.seqs:
            if seq.sample:
                end = seq.start_pos + len(seq.token_ids)
                params = self.scheduler.requests[seq.request_id].params
                token, lp = self._next_token(self.slots(seq.block_ids, 0, end), params)
                sampled.append(SampledToken(seq.request_id, token))
                lps[seq.request_id] = lp
        updates = self.scheduler.update(plan, StepResult(tuple(sampled)))
        return [
            CoreOutput(
                request_id=u.request_id,
                new_token_ids=u.new_token_ids,
                # As the real engine: one per new token when asked for, none otherwise.
                logprobs=(lp,) if u.new_token_ids and (lp := lps.get(u.request_id)) else (),
                finished=u.finished,
                finish_reason=u.finish_reason,
                prefilled=u.prefilled,
                num_prompt_tokens=u.num_prompt_tokens,
                num_output_tokens=u.num_output_tokens,
                num_cached_tokens=u.num_cached_tokens,
            )
            for u in updates
        ]

    def _prompt_tokens(self, plan: StepPlan) -> int:
        """Prompt tokens among the plan's tokens (positions before each prompt's end)."""
        n = 0
        for seq in plan.seqs:
            prompt_len = self.scheduler.requests[seq.request_id].num_prompt_tokens
            n += max(0, min(seq.start_pos + len(seq.token_ids), prompt_len) - seq.start_pos)
        return n

    def _next_token(
        self, slots: list[int], params: SamplingParams
    ) -> tuple[int, TokenLogprobs | None]:
        """A deterministic hash of every layer's cached KV for the sequence (greedy), or a draw
        by the real sampler from logits that are a function of that hash (temperature > 0); with
        its logprobs when asked for (greedy: a scripted value, also a function of the hash)."""
        kv = self.cache[:, torch.tensor(slots, dtype=torch.long)].double()  # [L, n, 2, H, D]
        weights = torch.arange(1, len(slots) + 1, dtype=torch.float64)[None, :, None, None, None]
        h = int((kv * weights).sum().item()) * 7 + 13 * len(slots)
        if params.greedy:
            token = h % self.cfg.vocab_size
            if params.logprobs is None:
                return token, None
            return token, TokenLogprobs(token, -((h // self.cfg.vocab_size) % 997) / 100.0, ())
        gen = torch.Generator().manual_seed(h % (1 << 63))
        logits = 2.0 * torch.randn(1, self.cfg.vocab_size, generator=gen)  # [1, vocab]
        out = self.sampler.sample(logits, [params], [len(slots)])
        return out.token_ids[0], out.logprobs[0]

    def _request(
        self, request_id: str, prompt: list[int], params: SamplingParams, prefill_only: bool
    ) -> Request:
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt),
            params=params,
            eos_token_ids=(self.cfg.eos_token_id,),
            prefill_only=prefill_only,
        )

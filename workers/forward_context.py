"""The state of one forward pass (batch, KV cache, attention plans, layer hook), set for its duration.

Model code reads it with `get_forward_context()` instead of threading it through every call (as vLLM).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from batonserve.kernels.attention import (
    DecodePlan,
    PrefillPlan,
    decode_attention,
    plan_decode,
    plan_prefill,
    prefill_attention,
)
from batonserve.workers.forward_batch import ForwardBatch


@dataclass
class AttentionMetadata:
    """Attention layouts for one batch, built once and shared by every layer (one per window size).

    Sequences adding one token use the split-K decode kernel; longer ones the prefill kernel. A mixed
    batch runs both on their own rows, so decodes are not padded to the longest prefill chunk.
    """

    batch: ForwardBatch
    block_size: int
    decode_plans: dict[int | None, DecodePlan] = field(default_factory=dict)
    prefill_plans: dict[int | None, PrefillPlan] = field(default_factory=dict)
    decode_rows: torch.Tensor | None = None  # [n_decode] q rows of one-token sequences (mixed only)
    prefill_rows: torch.Tensor | None = None  # [n_prefill_tokens] q rows of the others (mixed only)
    mixed: bool = False

    def __post_init__(self) -> None:
        b = self.batch
        if b.is_decode_only:
            return
        q_lens = b.cu_query_lens[1:] - b.cu_query_lens[:-1]  # [B]
        one = q_lens == 1
        if not bool(one.any()):
            return
        self.mixed = True
        self._dec_seqs = one.nonzero()[:, 0]
        self._pf_seqs = (~one).nonzero()[:, 0]
        starts = b.cu_query_lens[:-1].long()
        self.decode_rows = starts[self._dec_seqs]
        tok_seq = torch.repeat_interleave(torch.arange(b.num_seqs, device=q_lens.device), q_lens)
        self.prefill_rows = (~one)[tok_seq].nonzero()[:, 0]  # token order within each sequence

    def decode_plan(self, window: int | None) -> DecodePlan:
        """The decode plan (of the one-token sequences) for a layer with window `window`."""
        if window not in self.decode_plans:
            b = self.batch
            tables, lens, max_len = b.block_tables, b.context_lens, b.max_context_len
            if self.mixed:
                tables, lens = tables[self._dec_seqs], lens[self._dec_seqs]
                max_len = int(lens.max())
            self.decode_plans[window] = plan_decode(
                tables, lens, self.block_size, sliding_window=window, max_context_len=max_len
            )
        return self.decode_plans[window]

    def prefill_plan(self, window: int | None) -> PrefillPlan:
        """The prefill plan (keys read from the paged cache) for a layer with window `window`."""
        if window not in self.prefill_plans:
            b = self.batch
            cu, lens, tables, starts = b.cu_query_lens, b.context_lens, b.block_tables, None
            if self.mixed:
                seqs = self._pf_seqs
                q_lens = (cu[1:] - cu[:-1])[seqs]
                starts = cu[:-1][seqs]
                cu = torch.cat([cu[:1], q_lens.cumsum(0).to(cu.dtype)])
                lens, tables = lens[seqs], tables[seqs]
            self.prefill_plans[window] = plan_prefill(
                cu,
                lens,
                q_starts=starts,
                block_tables=tables,
                block_size=self.block_size,
                sliding_window=window,
            )
        return self.prefill_plans[window]

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Attention of q [T, H, d] over the paged cache (new K/V already written) -> [T, H, d]."""
        if self.batch.is_decode_only:
            return decode_attention(q, k_cache, v_cache, self.decode_plan(window))[0]
        if not self.mixed:
            return prefill_attention(q, k_cache, v_cache, self.prefill_plan(window))[0]
        assert self.decode_rows is not None and self.prefill_rows is not None
        out = torch.empty_like(q)
        dec, _ = decode_attention(
            q.index_select(0, self.decode_rows), k_cache, v_cache, self.decode_plan(window)
        )
        pre, _ = prefill_attention(q, k_cache, v_cache, self.prefill_plan(window))
        out.index_copy_(0, self.decode_rows, dec)
        out.index_copy_(0, self.prefill_rows, pre)
        return out


class SPAttend(Protocol):
    """Sequence-parallel attention of one rank's rows (workers.sp_serving.forward.SPForward)."""

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """q [n, H, d], this rank's k/v [n, Hkv, d] -> [n, H, d] over every rank's keys."""
        ...


@dataclass
class ForwardContext:
    """What every layer of the current forward may read."""

    batch: ForwardBatch
    attn: AttentionMetadata
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v) [blocks, bs, Hkv, d]
    layer_hook: Callable[[int], None] | None = None
    rope_cos: torch.Tensor | None = None  # [num_tokens, head_dim] at batch.positions, model dtype
    rope_sin: torch.Tensor | None = None
    # Set: a sequence-parallel prefill; attention runs over the group, not the paged cache.
    sp: SPAttend | None = None


class _State(threading.local):
    """Per-thread current context: two runners may run forwards in two threads of one process."""

    current: ForwardContext | None = None


_state = _State()


@contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the current forward context (of this thread) inside the `with` block."""
    previous, _state.current = _state.current, ctx
    try:
        yield ctx
    finally:
        _state.current = previous


def get_forward_context() -> ForwardContext:
    """The current forward context; model layers call this only inside a forward."""
    ctx = _state.current
    assert ctx is not None, "no forward context set: call the model through ModelRunner"
    return ctx

"""The model forward of one rank's shard of a sequence-parallel prefill.

Every rank runs all layers on its own rows (RoPE at their global positions), writes its K/V rows
into its own paged blocks, and attends over every rank's keys with `sp_attention`; the MLPs and
norms are per row, so they need no communication.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from batonserve.workers.forward_batch import ForwardBatch
from batonserve.workers.forward_context import (
    AttentionMetadata,
    ForwardContext,
    set_forward_context,
)
from batonserve.workers.parallel import (
    AttentionDims,
    SPGroup,
    SPMetrics,
    plan_sp_attention,
    sp_attention,
)
from batonserve.workers.parallel.layout import ShardSpec


@dataclass
class SPForward:
    """One forward's sequence-parallel attention state (plan shared by every layer)."""

    group: SPGroup
    spec: ShardSpec
    dims: AttentionDims
    schedule: str | None = None  # None: the cost model picks (same choice on every rank)
    metrics: list[SPMetrics] = field(default_factory=list)  # one per layer
    _plan: Any = None

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """q [n, H, d], k/v [n, Hkv, d] of this rank's rows -> [n, H, d] (collective)."""
        if window is not None:
            raise ValueError("sequence_parallel: sliding-window layers are not supported")
        if self._plan is None:  # collective, once per forward: every rank reaches layer 0
            self._plan = plan_sp_attention(self.spec, self.group, self.dims, schedule=self.schedule)
        res = sp_attention(q, k, v, self._plan, self.group)
        self.metrics.append(res.metrics)
        return res.out

    @property
    def schedule_used(self) -> str:
        """The schedule the plan chose."""
        return self._plan.schedule if self._plan is not None else (self.schedule or "")


def attention_dims(runner: Any) -> AttentionDims:
    """Head geometry of a runner's model."""
    mc = runner.model_config
    elem = torch.empty((), dtype=runner.dtype).element_size()
    return AttentionDims(mc.num_heads, mc.num_kv_heads, mc.head_dim, elem)


def sp_prefill_forward(
    runner: Any,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    sp: SPForward,
    logits_rows: torch.Tensor,
    layer_hook: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run this rank's rows through the model; float32 logits [len(logits_rows), vocab].

    token_ids/positions/slots [n] int64: the rank's tokens, their global positions, and the paged
    cache slots its K/V rows go to; `layer_hook(i)` runs once layer i's rows are in the cache.
    """
    dev = runner.device
    n = int(token_ids.shape[0])
    batch = ForwardBatch(
        input_ids=token_ids.to(dev),
        positions=positions.to(dev),
        cu_query_lens=torch.tensor([0, n], dtype=torch.int32, device=dev),
        context_lens=torch.tensor([n], dtype=torch.int32, device=dev),
        block_tables=torch.zeros(1, 1, dtype=torch.int32, device=dev),  # unused: no paged reads
        slot_mapping=slots.to(dev),
        logits_indices=logits_rows.to(dev),
        max_query_len=max(n, 2),  # never the decode-only path
        max_context_len=n,
    )
    with torch.inference_mode():
        ctx = ForwardContext(
            batch=batch,
            attn=AttentionMetadata(batch, runner.block_size),
            kv_caches=runner.kv_caches,
            layer_hook=layer_hook,
            sp=sp,
        )
        with set_forward_context(ctx):
            logits: torch.Tensor = runner.model(
                batch.input_ids, batch.positions, batch.logits_indices
            )
    return logits

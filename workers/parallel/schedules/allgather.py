"""All-gather baseline: gather every rank's KV, then one local attention; no overlap."""

from __future__ import annotations

import torch

from batonserve.kernels.ring import BlockPlan, block_attention, plan_block
from batonserve.workers.parallel.comm import SPGroup, all_gather_padded
from batonserve.workers.parallel.metrics import StepRecorder
from batonserve.workers.parallel.schedules.base import (
    AttentionDims,
    GroupMeta,
    LinkBytes,
    Schedule,
    ScheduleResult,
    merged_result,
)


class AllGatherSchedule(Schedule):
    """Gather all KV (padded to the largest block), attend once."""

    def plan_blocks(self, meta: GroupMeta, rank: int, tile: int) -> tuple[BlockPlan, ...]:
        """One step: this rank's queries over every rank's KV, concatenated in rank order."""
        kv_pos = torch.cat([s.kv_pos for s in meta.shards])
        kv_seq = torch.cat([s.kv_seq for s in meta.shards])
        mine = meta.shards[rank]
        return (plan_block(mine.q_pos, mine.q_seq, kv_pos, kv_seq, tile=tile),)

    def bytes_per_step(
        self, n_q: list[int], n_kv: list[int], rank: int, dims: AttentionDims
    ) -> list[LinkBytes]:
        """A ring all-gather forwards N - 1 blocks padded to the largest."""
        return [LinkBytes((len(n_kv) - 1) * max(n_kv) * dims.kv_row_bytes, 0)]

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocks: tuple[BlockPlan, ...],
        meta: GroupMeta,
        g: SPGroup,
        scale: float,
    ) -> ScheduleResult:
        """Gather, then attend."""
        rec = StepRecorder(0)
        # K and V gathered separately: each is already contiguous, so no packing copy.
        ks = all_gather_padded(g, k, meta.n_kv, "allgather step 0 (K)", rec)
        vs = all_gather_padded(g, v, meta.n_kv, "allgather step 0 (V)", rec)
        k_all = torch.cat(ks) if len(ks) > 1 else ks[0]  # [sum n_kv, Hkv, d] in rank order
        v_all = torch.cat(vs) if len(vs) > 1 else vs[0]
        with rec.computing():
            out, lse = block_attention(q, k_all, v_all, blocks[0], scale=scale)
        return merged_result(q, out, lse, [rec])

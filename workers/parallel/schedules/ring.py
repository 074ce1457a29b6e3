"""Ring attention (pass-KV): KV blocks rotate round the ring; partial outputs merge by LSE.

Step s on rank r: attend r's queries over the KV block of rank (r - s) mod N while that block is
already being forwarded to r + 1 and the next one received from r - 1 (posted before the compute,
waited after it, so the transfer hides behind the block's attention). N steps, N - 1 transfers.
"""

from __future__ import annotations

import torch

from batonserve.kernels.attention import merge_attention_states
from batonserve.kernels.ring import BlockPlan, block_attention
from batonserve.workers.parallel.comm import P2P, SPGroup, post
from batonserve.workers.parallel.metrics import StepRecorder
from batonserve.workers.parallel.schedules.base import (
    AttentionDims,
    GroupMeta,
    LinkBytes,
    Schedule,
    ScheduleResult,
    merged_result,
    plan_pair,
)


class RingSchedule(Schedule):
    """Pass-KV ring attention."""

    def plan_blocks(self, meta: GroupMeta, rank: int, tile: int) -> tuple[BlockPlan, ...]:
        """Step s: this rank's queries over rank (rank - s)'s KV."""
        n = len(meta.shards)
        mine = meta.shards[rank]
        return tuple(plan_pair(mine, meta.shards[(rank - s) % n], tile) for s in range(n))

    def bytes_per_step(
        self, n_q: list[int], n_kv: list[int], rank: int, dims: AttentionDims
    ) -> list[LinkBytes]:
        """Step s < N-1 forwards the held KV block (K and V) of rank (rank - s)."""
        n, row = len(n_kv), dims.kv_row_bytes
        return [LinkBytes(n_kv[(rank - s) % n] * row if s < n - 1 else 0, 0) for s in range(n)]

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
        """Rotate KV, attend, merge."""
        n, r = g.world_size, g.rank
        n_kv = meta.n_kv
        # [n_kv_src, Hkv, d] each, contiguous: sent as two messages, no packing copy.
        cur_k, cur_v = k, v
        out: torch.Tensor | None = None
        lse: torch.Tensor | None = None
        recs: list[StepRecorder] = []
        for s in range(n):
            rec = StepRecorder(s)
            recs.append(rec)
            pending = None
            nxt_k, nxt_v = cur_k, cur_v
            if s < n - 1:
                # Post the next block's transfer first, so it runs while this block computes.
                rows = n_kv[(r - s - 1) % n]
                nxt_k = k.new_empty((rows, *k.shape[1:]))
                nxt_v = v.new_empty((rows, *v.shape[1:]))
                ops = [
                    P2P("send", cur_k, g.next_rank),
                    P2P("send", cur_v, g.next_rank),
                    P2P("recv", nxt_k, g.prev_rank),
                    P2P("recv", nxt_v, g.prev_rank),
                ]
                pending = post(g, ops, f"ring step {s}", rec)
            with rec.computing():
                o, lo = block_attention(q, cur_k, cur_v, blocks[s], scale=scale)
                if out is None or lse is None:
                    out, lse = o, lo
                else:
                    out, lse = merge_attention_states(out, lse, o, lo)  # float32, -inf guarded
            if pending is not None:
                pending.wait(g)
            cur_k, cur_v = nxt_k, nxt_v
        return merged_result(q, out, lse, recs)

"""TokenRing (pass-Q): queries travel one way round the ring, block results travel straight back.

Step s on rank r: attend the queries of rank (r - s) mod N over r's own KV, while those queries are
forwarded to r + 1 (and the next ones received from r - 1) on the main group; then send the block's
(out, lse) straight to the queries' owner (r - s) on the second group, and receive the result of
r's own queries over the KV of rank (r + s). Queries use one link direction and results the other,
so both carry data. Each rank merges the N partials of its queries by LSE in float32.
"""

from __future__ import annotations

import torch

from batonserve.kernels.attention import merge_attention_states
from batonserve.kernels.ring import BlockPlan, block_attention
from batonserve.workers.parallel.comm import P2P, Pending, SPGroup, post
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

LSE_BYTES = 4  # the LSE travels as float32 whatever the activation dtype


def _pack(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(out [n, H, d] f32, lse [n, H] f32) -> one contiguous uint8 message [n, H*d*eb + 4*H]."""
    n, heads, head_dim = out.shape
    ob = out.to(dtype).reshape(n, heads * head_dim).contiguous().view(torch.uint8)
    lb = lse.float().contiguous().view(torch.uint8)
    return torch.cat([ob, lb], dim=1)


def _unpack(
    buf: torch.Tensor, heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `_pack`: -> (out [n, H, d] f32, lse [n, H] f32)."""
    n = buf.shape[0]
    split = heads * head_dim * torch.empty(0, dtype=dtype).element_size()
    out = buf[:, :split].contiguous().view(dtype).view(n, heads, head_dim).float()
    lse = buf[:, split:].contiguous().view(torch.float32)
    return out, lse


class TokenRingSchedule(Schedule):
    """Pass-Q, bidirectional."""

    def plan_blocks(self, meta: GroupMeta, rank: int, tile: int) -> tuple[BlockPlan, ...]:
        """Step s: rank (rank - s)'s queries over this rank's KV."""
        n = len(meta.shards)
        mine = meta.shards[rank]
        return tuple(plan_pair(meta.shards[(rank - s) % n], mine, tile) for s in range(n))

    def bytes_per_step(
        self, n_q: list[int], n_kv: list[int], rank: int, dims: AttentionDims
    ) -> list[LinkBytes]:
        """Step s < N-1 forwards queries of rank (rank - s); step s >= 1 returns their result."""
        n = len(n_q)
        q_row = dims.num_heads * dims.head_dim * dims.elem_bytes
        res_row = q_row + dims.num_heads * LSE_BYTES
        return [
            LinkBytes(
                n_q[(rank - s) % n] * q_row if s < n - 1 else 0,
                n_q[(rank - s) % n] * res_row if s >= 1 else 0,
            )
            for s in range(n)
        ]

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
        """Forward queries, attend them over local KV, return results to owners, merge."""
        n, r = g.world_size, g.rank
        n_q = meta.n_q
        heads, head_dim = q.shape[1], q.shape[2]
        row_bytes = heads * head_dim * q.element_size() + heads * LSE_BYTES
        cur = q.contiguous()  # [n_q_src, H, d], the queries being served this step
        out = lse = None
        recs: list[StepRecorder] = []
        # Result transfers of step s are waited one step later, so they hide behind compute too.
        late: list[tuple[Pending, torch.Tensor | None]] = []
        for s in range(n):
            rec = StepRecorder(s)
            recs.append(rec)
            ops: list[P2P] = []
            nxt = cur
            if s < n - 1:
                nxt = cur.new_empty((n_q[(r - s - 1) % n], heads, head_dim))
                ops = [P2P("send", cur, g.next_rank), P2P("recv", nxt, g.prev_rank)]
            fwd = post(g, ops, f"tokenring step {s} (queries)", rec)
            res_in = None
            if s >= 1:
                # Own queries' result over rank (r + s)'s KV, computed there at its step s.
                res_in = torch.empty((n_q[r], row_bytes), dtype=torch.uint8, device=q.device)
                back_ops = [P2P("recv", res_in, (r + s) % n, back=True)]
                late.append((post(g, back_ops, f"tokenring step {s} (result recv)", rec), res_in))
            with rec.computing():
                o, lo = block_attention(cur, k, v, blocks[s], scale=scale)
            if s == 0:
                out, lse = o, lo
            else:
                msg = _pack(o, lo, q.dtype)
                send = [P2P("send", msg, (r - s) % n, back=True)]
                late.append((post(g, send, f"tokenring step {s} (result send)", rec), None))
            fwd.wait(g)
            cur = nxt
            # Finish the previous step's result transfers (this step's compute covered them).
            keep = []
            for pending, buf in late:
                if pending.rec is rec:
                    keep.append((pending, buf))
                    continue
                out, lse = self._finish(pending, buf, out, lse, g, heads, head_dim, q.dtype)
            late = keep
        for pending, buf in late:
            out, lse = self._finish(pending, buf, out, lse, g, heads, head_dim, q.dtype)
        return merged_result(q, out, lse, recs)

    @staticmethod
    def _finish(
        pending: Pending,
        buf: torch.Tensor | None,
        out: torch.Tensor | None,
        lse: torch.Tensor | None,
        g: SPGroup,
        heads: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Wait a result transfer; merge a received partial into (out, lse) in float32."""
        pending.wait(g)
        if buf is None:
            return out, lse
        o, lo = _unpack(buf, heads, head_dim, dtype)
        assert out is not None and lse is not None
        return merge_attention_states(out, lse, o, lo)

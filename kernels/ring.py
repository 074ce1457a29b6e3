"""Block attention between arbitrary token sets by global position, for sequence-parallel prefill.

A rank of a ring holds queries and keys whose global positions are not contiguous (zigzag, striped
layouts, a cached prefix held elsewhere), so the bottom-right plans of `attention.py` do not fit.
Here a query at position p of request s may attend a key at position j of the same request iff
j <= p: causal masking by global positions, which is bottom-right alignment for free when the
queries are the last tokens (cached prefix, chunked prefill).

`plan_block` cuts the queries into tiles and keeps, per tile, only the keys some query in it can see
(fully masked key ranges are skipped, which is what makes zigzag balanced). `block_attention` runs
one plan in float32 and returns (out, lse); a row that sees no key gives out = 0, lse = -inf.
Merging partials across blocks uses `attention.merge_attention_states` (float32, guarded).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from batonserve.kernels.attention import NEG_INF

DEFAULT_TILE = 128
MAX_SCORES = 1 << 24  # score elements per matmul (64 MiB in float32): long tiles run in row chunks


@dataclass(frozen=True)
class BlockTile:
    """A run of query rows and the key rows any of them may attend."""

    q_start: int  # first query row of the tile
    q_end: int  # one past the last query row
    k_range: tuple[int, int]  # key rows [a, b) (keys are in (request, position) order)
    mask_start: int  # keys before this offset in the range are visible to every query of the tile
    q_pos: torch.Tensor | None  # [t] int64 query positions, None when no key needs a mask
    k_pos: torch.Tensor | None  # [nk - mask_start] positions of the keys that need one


@dataclass(frozen=True)
class BlockPlan:
    """Tiles of one (query set, key set) pair; rows outside every tile see no key."""

    num_q: int
    tiles: tuple[BlockTile, ...]
    num_pairs: int  # allowed (query, key) pairs: 4 * heads * head_dim * num_pairs flops
    # [n_k] int64: keys are gathered once into (request, position) order before the tiles, which
    # then slice contiguous rows; None when the keys already come in that order.
    k_order: torch.Tensor | None = None


def _query_runs(q_pos: torch.Tensor, q_seq: torch.Tensor, tile: int) -> list[tuple[int, int]]:
    """Cut query rows into runs of one request, increasing positions, no jump over `tile`."""
    n = int(q_pos.shape[0])
    if n == 0:
        return []
    brk = torch.zeros(n, dtype=torch.bool)
    if n > 1:
        dp = q_pos[1:] - q_pos[:-1]
        brk[1:] = (q_seq[1:] != q_seq[:-1]) | (dp <= 0) | (dp > tile)
    brk[0] = True
    starts = [*torch.nonzero(brk).flatten().tolist(), n]
    runs: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(starts):
        runs.extend((s, min(s + tile, b)) for s in range(a, b, tile))
    return runs


def plan_block(
    q_pos: torch.Tensor,
    q_seq: torch.Tensor,
    k_pos: torch.Tensor,
    k_seq: torch.Tensor,
    *,
    tile: int = DEFAULT_TILE,
) -> BlockPlan:
    """Plan causal attention of queries (q_pos, q_seq [n_q]) over keys (k_pos, k_seq [n_k]) by position."""
    q_pos, q_seq = q_pos.long().cpu(), q_seq.long().cpu()
    k_pos, k_seq = k_pos.long().cpu(), k_seq.long().cpu()
    k_order = None
    if k_pos.numel() > 1:
        key = k_seq * (int(k_pos.max()) + 1) + k_pos
        if bool((key[1:] < key[:-1]).any()):
            # Out of order (e.g. zigzag blocks concatenated by rank): sort once, slice per tile.
            k_order = torch.argsort(key, stable=True)
            k_pos, k_seq = k_pos[k_order], k_seq[k_order]
    tiles: list[BlockTile] = []
    pairs = 0
    for a, b in _query_runs(q_pos, q_seq, tile):
        qp = q_pos[a:b]  # [t]
        seq = int(q_seq[a])
        hi = int(qp.max())
        rows = torch.nonzero((k_seq == seq) & (k_pos <= hi)).flatten()  # keys any row may see
        if rows.numel() == 0:
            continue
        kp = k_pos[rows]
        allowed = kp[None, :] <= qp[:, None]  # [t, nk]
        n_allowed = int(allowed.sum())
        if n_allowed == 0:
            continue
        pairs += n_allowed
        lo, top = int(rows[0]), int(rows[-1]) + 1
        assert top - lo == rows.numel(), "sorted keys give a contiguous range"
        # Keys at or before the tile's first position are seen by all its rows: only the tail
        # (about the diagonal) needs a mask.
        start = int((kp <= int(qp.min())).sum())
        full = start == rows.numel()
        tiles.append(
            BlockTile(a, b, (lo, top), start, None if full else qp, None if full else kp[start:])
        )
    return BlockPlan(int(q_pos.shape[0]), tuple(tiles), pairs, k_order)


def _tile_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    mask_start: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [t, H, d], k/v [nk, Hkv, d] -> (out [t, H, d], lse [t, H]) in float32.

    mask [t, nk - mask_start] covers only the last keys; the first mask_start are seen by every row.
    """
    t, num_heads, d = q.shape
    nk, num_kv = k.shape[0], k.shape[1]
    g = num_heads // num_kv
    # Query head h reads KV head h // g: group the g query heads of a KV head into one matmul.
    qg = q.float().view(t, num_kv, g, d).permute(1, 2, 0, 3).reshape(num_kv, g * t, d)
    s = torch.matmul(qg, k.float().permute(1, 2, 0)) * scale  # [Hkv, g*t, nk]
    s = s.view(num_kv, g, t, nk)
    if mask is not None:
        s[..., mask_start:].masked_fill_(~mask[None, None], NEG_INF)  # in place, tail columns only
    m = s.amax(dim=-1, keepdim=True)  # [Hkv, g, t, 1]
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # a row with no key: no inf - inf
    p = torch.exp(s - m_safe)
    denom = p.sum(dim=-1, keepdim=True)  # [Hkv, g, t, 1]
    o = torch.matmul(p.view(num_kv, g * t, nk), v.float().permute(1, 0, 2))  # [Hkv, g*t, d]
    o = o.view(num_kv, g, t, d) / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = m_safe + torch.log(denom)  # log(0) = -inf for a row with no key
    out = o.permute(2, 0, 1, 3).reshape(t, num_heads, d)
    return out, lse[..., 0].permute(2, 0, 1).reshape(t, num_heads)


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a block plan: q [n_q, H, d], k/v [n_k, Hkv, d] -> (out [n_q, H, d] f32, lse [n_q, H] f32)."""
    n_q, num_heads, d = q.shape
    if num_heads % max(1, k.shape[1]) != 0:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={k.shape[1]}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if plan.k_order is not None:
        order = plan.k_order.to(k.device)
        k, v = k.index_select(0, order), v.index_select(0, order)  # [n_k, Hkv, d] sorted
    out = torch.zeros(n_q, num_heads, d, dtype=torch.float32, device=q.device)
    lse = torch.full((n_q, num_heads), NEG_INF, dtype=torch.float32, device=q.device)
    for t in plan.tiles:
        kt, vt = k[t.k_range[0] : t.k_range[1]], v[t.k_range[0] : t.k_range[1]]
        mask = None
        if t.q_pos is not None and t.k_pos is not None:
            mask = (t.k_pos[None, :] <= t.q_pos[:, None]).to(q.device)  # [t, nk - mask_start]
        # Bound the [H, rows, nk] score tensor: a tile over a long key range runs in row chunks.
        step = max(1, MAX_SCORES // max(1, num_heads * kt.shape[0]))
        for a in range(t.q_start, t.q_end, step):
            b = min(a + step, t.q_end)
            m = None if mask is None else mask[a - t.q_start : b - t.q_start]
            o, s = _tile_attention(q[a:b], kt, vt, m, t.mask_start, scale)
            out[a:b] = o
            lse[a:b] = s
    return out, lse

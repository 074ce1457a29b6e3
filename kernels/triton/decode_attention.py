"""Triton paged decode attention, split-K over the context with an LSE merge (the Lean Attention idea).

One program per (sequence, KV head, split) handles all G = H / Hkv query heads of its KV head, so
a batch of one long sequence still spreads over the whole GPU: the split count is chosen so that
B * Hkv * splits fills the streaming multiprocessors. A second kernel merges the splits by LSE.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from batonserve.kernels.attention import DecodePlan
from batonserve.kernels.triton._common import (
    dot_flags,
    mma,
    online_softmax,
    pow2,
    rne_flag,
    softmax_result,
    to_dtype,
)
from batonserve.kernels.triton.merge import merge_states_flat


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [num_blocks, block_size, Hkv, D]
    v_ptr,
    bt_ptr,  # [B, max_blocks] int64 block table
    lens_ptr,  # [B] int64 context lengths
    part_out_ptr,  # [B, H, S, D] float32, normalised per split
    part_lse_ptr,  # [B, H, S] float32
    scale,
    window,  # sliding window (keys >= len - window), <= 0 for none
    split_len,  # positions per split, a multiple of BLOCK_N
    max_blocks,
    block_size,
    G,
    D,
    S,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ko,
    stride_kh,
    stride_vb,
    stride_vo,
    stride_vh,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    RNE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)  # int64
    lo = s.to(tl.int64) * split_len
    hi = tl.minimum(lo + split_len, ctx)
    if window > 0:
        lo = tl.maximum(lo, ctx - window)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * G + offs_g  # [BLOCK_G] query heads of this KV head
    g_ok = offs_g < G
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = (lo // BLOCK_N) * BLOCK_N  # aligned down; positions below lo are masked
    for n0 in range(start, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] absolute key positions
        ok = (pos >= lo) & (pos < hi)
        blk_idx = tl.minimum(pos // block_size, max_blocks - 1)
        blk = tl.load(bt_ptr + b * max_blocks + blk_idx, mask=ok, other=0)
        off = pos % block_size
        kv_mask = ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr
            + blk[:, None] * stride_kb
            + off[:, None] * stride_ko
            + kvh * stride_kh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        sc = mma(q, tl.trans(k), tl.zeros([BLOCK_G, BLOCK_N], tl.float32), UPCAST, PREC) * scale
        sc = tl.where(ok[None, :], sc, -float("inf"))
        p, alpha, m_i, l_i = online_softmax(sc, m_i, l_i)
        v = tl.load(
            v_ptr
            + blk[:, None] * stride_vb
            + off[:, None] * stride_vo
            + kvh * stride_vh
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = mma(to_dtype(p, v.dtype, RNE), v, acc * alpha[:, None], UPCAST, PREC)
    out, lse = softmax_result(acc, m_i, l_i)
    row = b * (G * tl.num_programs(1)) + heads  # [BLOCK_G] flat (b, h)
    tl.store(
        part_out_ptr + (row[:, None] * S + s) * D + offs_d[None, :],
        out,
        mask=g_ok[:, None] & d_ok[None, :],
    )
    tl.store(part_lse_ptr + row * S + s, lse, mask=g_ok)


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index`."""
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def lean_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """Splits so that B * Hkv * splits is about two waves of programs, each split >= 64 keys."""
    if device.type != "cuda":
        return max(1, min(8, math.ceil(max_len / 256)))
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    want = math.ceil(target / max(1, batch * num_kv_heads))
    return max(1, min(want, math.ceil(max_len / 64), 128))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: DecodePlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `decode_attention` (same plan, same results); needs plan.context_lens.

    The split count is the kernel's own (`lean_num_splits`), not plan.num_splits: any split of the
    context merges to the same result.
    """
    assert plan.context_lens is not None, "plan built without context_lens"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    b, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[-2]
    block_size = k_cache.shape[1]
    group = num_heads // num_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    tables = plan.block_ids.view(b, -1)  # [B, max_blocks], zero-padded past each context
    max_blocks = tables.shape[1]
    max_len = max_blocks * block_size  # upper bound of every context (no device sync)
    # Keys are looked up per position, so the tile needn't match the page size: 64 on a GPU.
    block_n = 64 if q.is_cuda else pow2(block_size, hi=64)
    splits = num_splits or lean_num_splits(b, num_kv, max_len, q.device)
    split_len = math.ceil(math.ceil(max_len / splits) / block_n) * block_n
    splits = max(1, math.ceil(max_len / split_len))
    part_out = torch.empty(b, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, num_heads, splits, dtype=torch.float32, device=q.device)
    lens = plan.context_lens.to(device=q.device, dtype=torch.int64)
    upcast, prec = dot_flags(q.dtype)
    q = q.contiguous() if q.stride(-1) != 1 else q
    _decode_split_kernel[(b, num_kv, splits)](
        q,
        k_cache,
        v_cache,
        tables,
        lens,
        part_out,
        part_lse,
        scale,
        plan.sliding_window or 0,
        split_len,
        max_blocks,
        block_size,
        group,
        head_dim,
        splits,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        BLOCK_G=pow2(group),
        BLOCK_N=block_n,
        BLOCK_D=pow2(head_dim),
        UPCAST=upcast,
        PREC=prec,
        RNE=rne_flag(),
    )
    # [S, B*H, D] view of the partials for the merge kernel.
    out, lse = merge_states_flat(
        part_out.view(b * num_heads, splits, head_dim).transpose(0, 1),
        part_lse.view(b * num_heads, splits).transpose(0, 1),
        q.dtype,
    )
    return out.view(b, num_heads, head_dim), (lse.view(b, num_heads) if return_lse else None)

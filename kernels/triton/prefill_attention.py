"""Triton varlen prefill attention with a cached prefix: bottom-right causal, sliding window, GQA, LSE.

Flash-attention style: one program per (query block, sequence, head) streams the sequence's keys
in blocks with an online softmax. Keys are gathered through the plan's k_index, so the same kernel
reads flat varlen keys or a paged cache (cached prefix + the new chunk), exactly as the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from batonserve.kernels.attention import PrefillPlan
from batonserve.kernels.triton._common import (
    dot_flags,
    mma,
    online_softmax,
    pow2,
    rne_flag,
    softmax_result,
    to_dtype,
)


@triton.jit
def _prefill_kernel(
    q_ptr,  # [num_q_rows, H, D]
    k_ptr,  # [num_k_rows, Hkv, D] (flat keys or a flattened paged cache)
    v_ptr,
    q_index_ptr,  # [B, max_q] int64 row of q for query i of sequence b
    k_index_ptr,  # [B, max_k] int64 row of k for key j of sequence b
    q_lens_ptr,  # [B] int64
    k_lens_ptr,  # [B] int64
    out_start_ptr,  # [B] int64 first output row of sequence b (packed, sequence order)
    out_ptr,  # [num_out_rows, H, D]
    lse_ptr,  # [num_out_rows, H] float32 (written when WRITE_LSE)
    scale,
    window,
    G,
    D,
    H,
    max_q,
    max_k,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    RNE: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + b)
    k_len = tl.load(k_lens_ptr + b)
    if m0 >= q_len:
        return
    kvh = h // G
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < D
    q_rows = tl.load(q_index_ptr + b * max_q + offs_m, mask=m_ok, other=0)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = k_len - q_len + offs_m  # absolute key position of each query (bottom-right causal)
    lo = k_len * 0
    hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, k_len - q_len + m0 + BLOCK_M)
        if HAS_WINDOW:
            lo = tl.maximum(lo, k_len - q_len + m0 - window + 1)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = (offs_n >= 0) & (offs_n < k_len)
        k_rows = tl.load(k_index_ptr + b * max_k + offs_n, mask=n_ok, other=0)
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(
            k_ptr + k_rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        sc = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PREC) * scale
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                ok = ok & (offs_n[None, :] > q_pos[:, None] - window)
        sc = tl.where(ok, sc, -float("inf"))
        p, alpha, m_i, l_i = online_softmax(sc, m_i, l_i)
        v = tl.load(
            v_ptr + k_rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        acc = mma(to_dtype(p, v.dtype, RNE), v, acc * alpha[:, None], UPCAST, PREC)
    out, lse = softmax_result(acc, m_i, l_i)
    out_rows = tl.load(out_start_ptr + b) + offs_m  # [BLOCK_M]
    tl.store(
        out_ptr + (out_rows[:, None] * H + h) * D + offs_d[None, :],
        to_dtype(out, out_ptr.dtype.element_ty, RNE),
        mask=m_ok[:, None] & d_ok[None, :],
    )
    if WRITE_LSE:
        tl.store(lse_ptr + out_rows * H + h, lse, mask=m_ok)


def prefill_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: PrefillPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton twin of `prefill_attention` (same plan, same results); needs the plan's lengths."""
    assert plan.q_lens is not None and plan.k_lens is not None, "plan built without lengths"
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k.shape[-2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_flat = k.reshape(-1, num_kv, head_dim)  # a paged cache becomes [num_slots, Hkv, d]
    v_flat = v.reshape(-1, num_kv, head_dim)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_flat.stride(-1) != 1 or v_flat.stride(-1) != 1:
        k_flat, v_flat = k_flat.contiguous(), v_flat.contiguous()
    num_seqs, max_q = plan.q_index.shape
    max_k = plan.k_index.shape[1]
    q_lens = plan.q_lens.to(device=q.device, dtype=torch.int64)
    k_lens = plan.k_lens.to(device=q.device, dtype=torch.int64)
    out_start = torch.cumsum(q_lens, 0) - q_lens  # [B], packed output rows in sequence order
    out = torch.empty(plan.num_rows, num_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(plan.num_rows, num_heads, dtype=torch.float32, device=q.device)
    if plan.num_rows == 0 or max_q == 0:
        return out, (lse if return_lse else None)
    # fp32 IEEE dots and head_dim > 128 need twice the registers / shared memory per tile.
    cap = 32 if q.dtype == torch.float32 or head_dim > 128 else 64
    block_m = pow2(max_q, hi=cap)
    block_n = pow2(max_k, hi=cap)
    upcast, prec = dot_flags(q.dtype)
    grid = (triton.cdiv(max_q, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        k_flat,
        v_flat,
        plan.q_index.contiguous(),
        plan.k_index.contiguous(),
        q_lens,
        k_lens,
        out_start,
        out,
        lse,
        scale,
        plan.sliding_window or 0,
        num_heads // num_kv,
        head_dim,
        num_heads,
        max_q,
        max_k,
        q.stride(0),
        q.stride(1),
        k_flat.stride(0),
        k_flat.stride(1),
        v_flat.stride(0),
        v_flat.stride(1),
        CAUSAL=plan.causal,
        HAS_WINDOW=plan.causal and plan.sliding_window is not None,
        WRITE_LSE=return_lse,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=pow2(head_dim),
        UPCAST=upcast,
        PREC=prec,
        RNE=rne_flag(),
    )
    return out, (lse if return_lse else None)

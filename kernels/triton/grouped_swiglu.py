"""Triton grouped expert FFN (SwiGLU) over token rows already permuted by expert.

Rows of expert e are contiguous (counts[e] of them). The grid's first axis walks "tiles": expert
e owns ceil(counts[e] / BLOCK_M) of them; a program finds its expert from the cumulative tile
counts, so no host sync is needed (the grid is an upper bound; surplus programs exit at once).
One kernel, run twice: act = silu(x @ Wg^T) * (x @ Wu^T) [N, INTER] (SWIGLU), then
out = act @ Wd^T [N, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batonserve.kernels.triton._common import dot_flags, mma, pow2, rne_flag, to_dtype


@triton.jit
def _tile_rows(
    tile, tile_end_ptr, row_start_ptr, counts_ptr, E, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr
):
    """(expert, first row, end row) of a tile; expert == E marks a surplus tile."""
    offs_e = tl.arange(0, BLOCK_E)
    ends = tl.load(tile_end_ptr + offs_e, mask=offs_e < E, other=2**62)  # inclusive cumsum of tiles
    e = tl.sum((ends <= tile).to(tl.int32), axis=0)
    e_safe = tl.minimum(e, E - 1)
    count = tl.load(counts_ptr + e_safe)
    first_tile = tl.load(tile_end_ptr + e_safe) - (count + BLOCK_M - 1) // BLOCK_M
    start = tl.load(row_start_ptr + e_safe) + (tile - first_tile) * BLOCK_M
    end = tl.load(row_start_ptr + e_safe) + count
    return e, start, end


@triton.jit
def _grouped_matmul_kernel(
    a_ptr,  # [N, K] rows grouped by expert
    w_ptr,  # [E, NOUT, K]; with SWIGLU [E, 2 * NOUT, K], gate rows then up rows
    out_ptr,  # [N, NOUT]
    tile_end_ptr,  # [E] int64 inclusive cumsum of tiles per expert
    row_start_ptr,  # [E] int64 first row of each expert
    counts_ptr,  # [E] int64
    E,
    K,
    NOUT,
    stride_we,
    stride_wn,
    SWIGLU: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    RNE: tl.constexpr,
):
    """One tile of out = a @ W[e]^T, or with SWIGLU silu(a @ Wg[e]^T) * (a @ Wu[e]^T)."""
    tile = tl.program_id(0).to(tl.int64)
    e, start, end = _tile_rows(tile, tile_end_ptr, row_start_ptr, counts_ptr, E, BLOCK_E, BLOCK_M)
    if e >= E:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < end
    n_ok = offs_n < NOUT
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # the gate's with SWIGLU
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # SWIGLU only: the up projection's
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + offs_m[:, None] * K + offs_k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        wmask = k_ok[:, None] & n_ok[None, :]
        w = tl.load(
            w_base + offs_n[None, :] * stride_wn + offs_k[:, None], mask=wmask, other=0.0
        )  # [K, N]
        acc = mma(a, w, acc, UPCAST, PREC)
        if SWIGLU:
            wu = tl.load(
                w_base + (offs_n[None, :] + NOUT) * stride_wn + offs_k[:, None],
                mask=wmask,
                other=0.0,
            )
            acc_u = mma(a, wu, acc_u, UPCAST, PREC)
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u  # silu(gate) * up
    tl.store(
        out_ptr + offs_m[:, None] * NOUT + offs_n[None, :],
        to_dtype(acc, out_ptr.dtype.element_ty, RNE),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def grouped_swiglu_triton(
    x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Triton twin of `grouped_swiglu`: x [N, D] grouped by expert, counts [E] -> [N, D]."""
    rows, dim = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    inter = two_inter // 2
    x = x.contiguous()
    w_gate_up = w_gate_up if w_gate_up.stride(-1) == 1 else w_gate_up.contiguous()
    w_down = w_down if w_down.stride(-1) == 1 else w_down.contiguous()
    out = torch.empty_like(x)
    if rows == 0:
        return out
    cap = 32 if x.dtype == torch.float32 else 64  # fp32 IEEE dots need 2x the registers
    block_m = pow2(rows, hi=cap)
    counts = counts.to(device=x.device, dtype=torch.int64)
    tile_end = torch.cumsum((counts + block_m - 1) // block_m, 0)  # [E] inclusive
    row_start = torch.cumsum(counts, 0) - counts
    # Every expert adds at most one partial tile: an upper bound of the tiles without a sync.
    max_tiles = triton.cdiv(rows, block_m) + num_experts
    act = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    upcast, prec = dot_flags(x.dtype)
    common = {
        "BLOCK_E": pow2(num_experts, lo=2),
        "BLOCK_M": block_m,
        "UPCAST": upcast,
        "PREC": prec,
        "RNE": rne_flag(),
    }
    block_n, block_k = pow2(inter, hi=cap), pow2(dim, hi=cap)
    _grouped_matmul_kernel[(max_tiles, triton.cdiv(inter, block_n))](
        x, w_gate_up, act, tile_end, row_start, counts, num_experts, dim, inter,
        w_gate_up.stride(0), w_gate_up.stride(1), SWIGLU=True, BLOCK_N=block_n, BLOCK_K=block_k,
        **common,
    )  # fmt: skip
    block_n, block_k = pow2(dim, hi=cap), pow2(inter, hi=cap)
    _grouped_matmul_kernel[(max_tiles, triton.cdiv(dim, block_n))](
        act, w_down, out, tile_end, row_start, counts, num_experts, inter, dim,
        w_down.stride(0), w_down.stride(1), SWIGLU=False, BLOCK_N=block_n, BLOCK_K=block_k,
        **common,
    )  # fmt: skip
    return out

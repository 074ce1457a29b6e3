"""Triton LSE merge of S partial attention results (split-K decode, ring attention, prefix + new)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batonserve.kernels.triton._common import pow2, rne_flag, to_dtype


@triton.jit
def _merge_kernel(
    outs_ptr,  # [S, N, D] partial outputs, any float dtype
    lses_ptr,  # [S, N] float32 partial log-sum-exps (-inf: the partial saw no key)
    out_ptr,  # [N, D]
    lse_ptr,  # [N] float32
    S,
    D,
    stride_os,
    stride_on,
    stride_ls,
    stride_ln,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(
        lses_ptr + offs_s * stride_ls + row * stride_ln, mask=offs_s < S, other=-float("inf")
    )
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == -float("inf"), 0.0, m)  # all partials empty: avoid inf - inf
    w = tl.exp(lse - m_safe)  # [BLOCK_S], exactly 0 for empty partials
    total = tl.sum(w, axis=0)
    has = total > 0
    lse_out = tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)), -float("inf"))
    w = w / tl.where(has, total, 1.0)
    ptrs = outs_ptr + offs_s[:, None] * stride_os + row * stride_on + offs_d[None, :]
    part = tl.load(ptrs, mask=(offs_s[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    acc = tl.sum(part.to(tl.float32) * w[:, None], axis=0)  # [BLOCK_D]
    tl.store(
        out_ptr + row * D + offs_d, to_dtype(acc, out_ptr.dtype.element_ty, RNE), mask=offs_d < D
    )
    tl.store(lse_ptr + row, lse_out)


def merge_states_flat(
    outs: torch.Tensor, lses: torch.Tensor, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge outs [S, N, D] (last dim contiguous) by lses [S, N] -> (out [N, D] out_dtype, lse [N] fp32)."""
    num_splits, rows, dim = outs.shape
    assert outs.stride(2) == 1 and lses.shape == (num_splits, rows)
    lses = lses.float()
    out = torch.empty(rows, dim, dtype=out_dtype, device=outs.device)
    lse = torch.empty(rows, dtype=torch.float32, device=outs.device)
    if rows == 0:
        return out, lse
    _merge_kernel[(rows,)](
        outs,
        lses,
        out,
        lse,
        num_splits,
        dim,
        outs.stride(0),
        outs.stride(1),
        lses.stride(0),
        lses.stride(1),
        BLOCK_S=pow2(num_splits, lo=2),
        BLOCK_D=pow2(dim),
        RNE=rne_flag(),
    )
    return out, lse


def merge_attention_states_many_triton(
    outs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `merge_attention_states_many`: outs [S, ..., H, d], lses [S, ..., H]."""
    lead = outs.shape[1:-1]  # [..., H]
    flat_outs = outs.reshape(outs.shape[0], -1, outs.shape[-1]).contiguous()
    flat_lses = lses.reshape(lses.shape[0], -1).contiguous()
    out, lse = merge_states_flat(flat_outs, flat_lses, outs.dtype)
    return out.view(*lead, outs.shape[-1]), lse.view(lead)

"""Triton RMSNorm and fused residual-add + RMSNorm, one program per row, Llama's rounding order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batonserve.kernels.triton._common import pow2, rne_flag, to_dtype


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [rows, D]
    res_ptr,  # [rows, D] residual (read when HAS_RES)
    w_ptr,  # [D]
    out_ptr,  # [rows, D] normalized
    sum_ptr,  # [rows, D] x + residual (written when HAS_RES)
    D,
    eps,
    stride_x,
    stride_r,
    HAS_RES: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
    BLOCK_D: tl.constexpr,
    RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + offs, mask=ok, other=0.0)
        # Round the sum to the input dtype first: the residual stream is kept in that dtype.
        x = to_dtype(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty, RNE)
        tl.store(sum_ptr + row * D + offs, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = xf * rstd
    if ROUND_NORMED:
        # Half precision: cast the normalized row back before the weight (Hugging Face's order).
        normed = to_dtype(normed, x_ptr.dtype.element_ty, RNE).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, to_dtype(normed * w, out_ptr.dtype.element_ty, RNE), mask=ok)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the row kernel over x [..., D]; returns (normed, x + residual or None)."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = x2 if residual is None else residual.reshape(-1, dim)
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0] > 0:
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight.contiguous(),
            out,
            summed,
            dim,
            eps,
            x2.stride(0),
            r2.stride(0),
            HAS_RES=residual is not None,
            ROUND_NORMED=x.dtype != torch.float32,
            BLOCK_D=pow2(dim, lo=2),
            RNE=rne_flag(),
        )
    normed = out.view(x.shape)
    return normed, (summed.view(x.shape) if residual is not None else None)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of `rms_norm`: x [..., D], weight [D]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `fused_add_rms_norm`: (rms_norm(x + residual), x + residual) in one pass."""
    normed, summed = _launch(x, residual, weight, eps)
    assert summed is not None
    return normed, summed

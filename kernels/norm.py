"""RMSNorm kernels (torch reference): plain and fused residual-add + norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batonserve.kernels.cpu import small_ops
from batonserve.kernels.dispatch import use_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim as Llama computes it: normalize in float32, cast, then scale."""
    if use_triton(x):
        from batonserve.kernels.triton.rms_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    if small_ops.usable(x, weight):  # one C pass, same rounding order as below
        return small_ops.rms_norm(x, weight, eps)[0]
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Half precision: normalize in float32, cast back before the weight (HF's rounding order).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual): the pre-norm block's residual stream step."""
    if use_triton(x) and residual.dtype == x.dtype:
        from batonserve.kernels.triton.rms_norm import fused_add_rms_norm_triton

        return fused_add_rms_norm_triton(x, residual, weight, eps)
    if small_ops.usable(x, residual, weight) and x.shape == residual.shape:
        out, summed_c = small_ops.rms_norm(x, weight, eps, residual)
        assert summed_c is not None
        return out, summed_c
    summed = x + residual
    return rms_norm(summed, weight, eps), summed

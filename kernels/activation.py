"""SwiGLU's activation: silu(gate) * up over a fused [T, 2I] gate|up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batonserve.kernels.cpu import small_ops


def silu_and_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] (gate columns, then up) -> silu(gate) * up [T, I], rounded as torch rounds."""
    if gu.dim() == 2 and gu.shape[1] % 2 == 0 and small_ops.usable(gu) and small_ops.has_silu_mul():
        return small_ops.silu_mul(gu)  # one C pass instead of silu, mul and their outputs
    inter = gu.shape[-1] // 2
    return F.silu(gu[..., :inter]) * gu[..., inter:]

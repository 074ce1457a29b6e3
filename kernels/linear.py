"""Linear layers with weights pre-packed for the CPU GEMM library (oneDNN), F.linear elsewhere.

`F.linear` re-lays out a bf16 weight for the matmul kernel on every call; a weight packed once at
load time skips that (1.2-2.9x faster at batch 1-128 for this repo's bench model). The packed copy
is an opaque oneDNN tensor, used only by `linear`; the plain weight stays the reference.

bf16 on CPU has two more paths. A batch of 1-3 rows goes through a C kernel that streams the
plain weight faster than oneDNN (kernels/cpu/gemv.py). And on an Intel CPU without AMX, where
oneDNN's AVX-512-BF16 GEMM runs at half the speed of fp32 FMAs, a weight can be packed into
panels instead (kernels/cpu/panel_gemm.py: bf16 in memory, float32 arithmetic) for every larger
batch; the model runner decides (EngineConfig.cpu_fp32_gemm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batonserve.kernels.cpu import gemv, panel_gemm

_PACKABLE = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedWeight:
    """One weight laid out for the CPU GEMM: oneDNN's packing, or (bf16) panel_gemm's panels."""

    native: torch.Tensor | None
    panels: torch.Tensor | None = None


def can_pack(weight: torch.Tensor) -> bool:
    """True when `weight` [out, in] can be packed: CPU, float32/bfloat16, oneDNN built in."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(weight: torch.Tensor, fp32_gemm: bool = False) -> PackedWeight | None:
    """`weight` [out, in] packed for oneDNN, or with `fp32_gemm` (bf16 only, where the panel
    kernel is built) into panels instead; None where it cannot be packed."""
    if not can_pack(weight):
        return None
    if fp32_gemm and weight.dtype == torch.bfloat16 and panel_gemm.available():
        return PackedWeight(None, panel_gemm.to_panels(weight.detach()))
    try:
        native = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    except (RuntimeError, AttributeError):  # an op missing from this torch build
        return None
    return PackedWeight(native)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: PackedWeight | None = None,
    fp32_out: bool = False,
) -> torch.Tensor:
    """x [..., in] @ weight.T + bias -> [..., out], through `packed` when given (x on CPU).

    `fp32_out`: the caller wants float32 anyway (logits); the C kernels then skip rounding."""
    # Under torch.compile the plain weight goes in: inductor (freezing) packs it for its own GEMM.
    if (
        packed is not None
        and x.dtype == weight.dtype
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
    ):
        if gemv.applies(x, weight, bias):  # a few rows: stream the plain weight
            return gemv.gemv(x, weight, bias, fp32_out)
        if packed.panels is not None:
            rows = x.reshape(-1, x.shape[-1])
            out = panel_gemm.panel_gemm(rows, packed.panels, weight.shape[0], bias, fp32_out)
            return out.view(*x.shape[:-1], weight.shape[0])
        native: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, packed.native, bias, "none", [], ""
        )
        return native
    return F.linear(x, weight, bias)

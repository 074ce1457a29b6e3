"""Linear layers with weights pre-packed for the CPU GEMM library (oneDNN), F.linear elsewhere.

`F.linear` re-lays out a bf16 weight for the matmul kernel on every call; a weight packed once at
load time skips that (1.2-2.9x faster at batch 1-128 for this repo's bench model). The packed copy
is an opaque oneDNN tensor, used only by `linear`; the plain weight stays the reference.

bf16 on CPU has more paths. A batch of 1-3 rows goes through a C kernel that streams the plain
weight faster than oneDNN (kernels/cpu/gemv.py). Larger batches can go through panels instead of
oneDNN's packing (kernels/cpu/panel_gemm.py): widened to float32 FMAs on an Intel CPU without
AMX, where oneDNN's AVX-512-BF16 GEMM runs at half the speed of fp32 FMAs; or as pairs of k for
AVX-512-BF16 dot products on AMD Zen 4, where oneDNN streams small batches slowly. The model
runner picks the layout (EngineConfig.cpu_gemm).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batonserve.kernels.cpu import gemv, panel_gemm

_PACKABLE = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class PackedWeight:
    """One weight laid out for the CPU GEMM: oneDNN's packing, or (bf16) panel_gemm's panels of
    either kind (their shape tells which)."""

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


def pack_weight(weight: torch.Tensor, layout: str = "onednn") -> PackedWeight | None:
    """`weight` [out, in] packed in `layout`: "onednn", or for a bf16 weight where the kernel is
    built, "fp32_panels" / "dot_panels" (kernels/cpu/panel_gemm.py); None where it cannot be
    packed. A panel layout that is not built here falls back to oneDNN's."""
    if not can_pack(weight):
        return None
    dot = layout == "dot_panels"
    if layout != "onednn" and weight.dtype == torch.bfloat16 and panel_gemm.available(dot):
        return PackedWeight(None, panel_gemm.to_panels(weight.detach(), dot))
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

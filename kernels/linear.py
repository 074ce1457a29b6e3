"""Linear layers with weights pre-packed for the CPU GEMM library (oneDNN), F.linear elsewhere.

`F.linear` re-lays out a bf16 weight for the matmul kernel on every call; a weight packed once at
load time skips that (1.2-2.9x faster at batch 1-128 for this repo's bench model). The packed copy
is an opaque oneDNN tensor, used only by `linear`; the plain weight stays the reference.

A bf16 weight may also keep a float32 packed copy. Without AMX, oneDNN's bf16 GEMM (AVX-512-BF16)
can run at half the speed of its fp32 GEMM once a batch has a dozen rows, while a few rows are
bound by reading the weight, where bf16 reads half the bytes. So batches of FP32_MIN_ROWS rows or
more go through the fp32 copy (inputs widened exactly, fp32 accumulation as in the bf16 GEMM,
output rounded back to bf16) and smaller ones through the bf16 copy. The model runner decides
which weights keep the copy (EngineConfig.cpu_fp32_gemm). A bf16 batch of 1-8 rows goes through
a C kernel instead (kernels/cpu/gemv.py): it streams the weight faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batonserve.kernels.cpu import gemv

_PACKABLE = (torch.float32, torch.bfloat16)
FP32_MIN_ROWS = 16  # measured crossover on a Xeon without AMX: ~12 rows


@dataclass(frozen=True)
class PackedWeight:
    """One weight packed for oneDNN: in its own dtype, and optionally as float32 (bf16 only)."""

    native: torch.Tensor
    fp32: torch.Tensor | None = None

    def extra_bytes(self) -> int:
        """Bytes the float32 copy adds (packed layouts may pad: an estimate from the shape)."""
        return 0 if self.fp32 is None else self.fp32.numel() * 4


def can_pack(weight: torch.Tensor) -> bool:
    """True when `weight` [out, in] can be packed: CPU, float32/bfloat16, oneDNN built in."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(weight: torch.Tensor, fp32_copy: bool = False) -> PackedWeight | None:
    """The oneDNN-packed copy of `weight` [out, in] (with a float32 one too when `fp32_copy` and
    the weight is bf16), or None where it cannot be packed."""
    if not can_pack(weight):
        return None
    reorder = torch.ops.mkldnn._reorder_linear_weight
    try:
        native = reorder(weight.detach())
        widen = fp32_copy and weight.dtype == torch.bfloat16
        wide = reorder(weight.detach().float()) if widen else None
    except (RuntimeError, AttributeError):  # an op missing from this torch build
        return None
    return PackedWeight(native, wide)


def _run_native(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed.native, bias, "none", [], "")
    return out


def _run_fp32(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, fp32_out: bool
) -> torch.Tensor:
    b = bias.float() if bias is not None else None
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
        x.float(), packed.fp32, b, "none", [], ""
    )
    return out if fp32_out else out.to(x.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: PackedWeight | None = None,
    fp32_out: bool = False,
) -> torch.Tensor:
    """x [..., in] @ weight.T + bias -> [..., out], through `packed` when given (x on CPU).

    `fp32_out`: the caller wants float32 anyway (logits); the fp32 GEMM then skips rounding."""
    # Under torch.compile the plain weight goes in: inductor (freezing) packs it for its own GEMM.
    if (
        packed is not None
        and x.dtype == weight.dtype
        and x.device.type == "cpu"
        and not torch.compiler.is_compiling()
    ):
        if packed.fp32 is not None and x.numel() >= FP32_MIN_ROWS * x.shape[-1]:
            return _run_fp32(x, packed, bias, fp32_out)
        if gemv.applies(x, weight, bias):  # a few rows: stream the plain weight
            return gemv.gemv(x, weight, bias, fp32_out)
        return _run_native(x, packed, bias)
    return F.linear(x, weight, bias)

"""Helpers shared by the Triton kernels: interpreter detection, block sizes, the portable dot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (TRITON_INTERPRET=1)."""
    return bool(triton.knobs.runtime.interpret)


def pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    """Next power of two >= n, clamped to [lo, hi] (tl.arange and tl.dot need powers of two >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PREC) for `mma`: the interpreter stores bf16 as uint16 and its tl.dot would multiply
    the raw bits, so it upcasts (bf16 products are exact in fp32, same result); fp32 uses IEEE, not TF32."""
    return interpreting(), "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation; see `dot_flags` for UPCAST and PREC."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


def rne_flag() -> bool:
    """RNE for `to_dtype`: the interpreter truncates fp32 -> bf16, GPUs round to nearest even."""
    return interpreting()


@triton.jit
def to_dtype(x, DT: tl.constexpr, RNE: tl.constexpr):
    """Cast fp32 x to DT; with RNE (interpreter only) bf16 is rounded to nearest even by hand."""
    if RNE:
        if tl.bfloat16 == DT:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(DT)
    else:
        return x.to(DT)

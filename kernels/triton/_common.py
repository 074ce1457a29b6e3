"""Helpers shared by the Triton kernels: interpreter detection, block sizes, the portable dot,
the online softmax of the attention kernels."""

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


@triton.jit
def online_softmax(sc, m_i, l_i):
    """Fold one key block's scores sc [M, N] fp32 (-inf where masked) into the running row max
    m_i [M] and sum l_i [M]: -> (p [M, N] unnormalised weights, alpha [M] to rescale the running
    output by, new m_i, new l_i). Exps use max 0 while a row has seen only -inf (no inf - inf)."""
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    p = tl.exp(sc - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return p, alpha, m_new, l_i


@triton.jit
def softmax_result(acc, m_i, l_i):
    """(out [M, D] = acc / l_i, lse [M]) after the last key block; a row that saw no key gives
    out 0 and lse -inf, as the torch references."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    m_fin = tl.where(m_i == -float("inf"), 0.0, m_i)
    lse = tl.where(has, m_fin + tl.log(tl.where(has, l_i, 1.0)), -float("inf"))
    return out, lse

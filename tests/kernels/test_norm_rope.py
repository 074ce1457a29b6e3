"""RMSNorm and RoPE kernels against direct float64 formulas."""

from __future__ import annotations

import math

import pytest
import torch

from batonserve.kernels.norm import fused_add_rms_norm, rms_norm
from batonserve.kernels.rope import (
    RopeScaling,
    apply_rope,
    rope_cos_sin,
    rope_cos_sin_cache,
    rope_inv_freq,
)

torch.set_num_threads(1)


def test_rms_norm_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g)
    w = torch.randn(32, generator=g)
    xd = x.double()
    ref = w.double() * xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rms_norm(x, w, 1e-5).double(), ref, atol=1e-5, rtol=1e-5)
    r = torch.randn(5, 32, generator=g)
    normed, summed = fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(summed, x + r)
    torch.testing.assert_close(normed, rms_norm(x + r, w, 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_half_precision(dtype: torch.dtype) -> None:
    x = torch.randn(4, 64) * 3
    w = torch.rand(64) + 0.5
    out = rms_norm(x.to(dtype), w.to(dtype), 1e-6)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), rms_norm(x, w, 1e-6), atol=5e-2, rtol=2e-2)


def _rotate_direct(x: torch.Tensor, pos: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """RoPE in float64 pair by pair: dims (i, i + d/2) rotate by angle pos * inv[i]."""
    out = x.double().clone()
    half = x.shape[-1] // 2
    for t in range(x.shape[0]):
        for i in range(half):
            a = float(pos[t]) * float(inv[i])
            x1, x2 = x[t, :, i].double(), x[t, :, i + half].double()
            out[t, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[t, :, i + half] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def test_rope_rotation_matches_direct_formula() -> None:
    d = 16
    inv = rope_inv_freq(d, 10000.0)
    torch.testing.assert_close(
        inv.double(), 1.0 / 10000.0 ** (torch.arange(0, d, 2).double() / d), rtol=1e-6, atol=0
    )
    pos = torch.tensor([0, 1, 5, 100, 37])
    x = torch.randn(5, 3, d)
    cos, sin = rope_cos_sin(pos, inv)
    torch.testing.assert_close(
        apply_rope(x, cos, sin).double(), _rotate_direct(x, pos, inv), atol=1e-4, rtol=1e-4
    )
    cache_cos, cache_sin = rope_cos_sin_cache(d, 128, 10000.0)
    torch.testing.assert_close(cache_cos[pos], cos)
    torch.testing.assert_close(cache_sin[pos], sin)


def test_rope_preserves_relative_position() -> None:
    """q·k after RoPE depends only on the position difference."""
    d = 32
    inv = rope_inv_freq(d, 10000.0)
    q, k = torch.randn(1, 1, d), torch.randn(1, 1, d)

    def dot(pq: int, pk: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([pq]), inv)
        ck, sk = rope_cos_sin(torch.tensor([pk]), inv)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert dot(10, 3) == pytest.approx(dot(107, 100), rel=1e-4, abs=1e-4)


def _llama3_direct(inv: list[float], s: RopeScaling) -> list[float]:
    """Meta's reference llama3 frequency scaling, written out per frequency."""
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / s.factor)
        else:
            sm = (s.original_max_position_embeddings / wl - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - sm) * f / s.factor + sm * f)
    return out


@pytest.mark.parametrize("old_len", [64, 8192])
def test_llama3_scaling_matches_direct_formula(old_len: int) -> None:
    s = RopeScaling("llama3", 8.0, 1.0, 4.0, old_len)
    base = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, s)
    ref = torch.tensor(_llama3_direct(base.tolist(), s))
    torch.testing.assert_close(scaled.double(), ref.double(), rtol=1e-6, atol=0)
    assert (scaled <= base).all() and (scaled < base).any() and (scaled == base).any()


def test_linear_scaling_and_unknown_type() -> None:
    base = rope_inv_freq(16, 10000.0)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0, RopeScaling("linear", 4.0)), base / 4)
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(16, 10000.0, RopeScaling("yarn", 4.0))

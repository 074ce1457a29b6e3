"""The C RMSNorm and RoPE (kernels/cpu/small_ops.py) against the torch references."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from batonserve.kernels import norm, rope
from batonserve.kernels.cpu import small_ops

pytestmark = pytest.mark.skipif(small_ops._library() is None, reason="no C compiler here")


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _reference(fn: Callable[[], Any]) -> Any:
    small_ops.set_enabled(False)
    try:
        return fn()
    finally:
        small_ops.set_enabled(True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "num_threads"), [(1, 1), (7, 1), (300, 2)])
def test_rms_norm_matches_reference(
    dtype: torch.dtype, rows: int, num_threads: int, threads: None
) -> None:
    torch.set_num_threads(num_threads)
    g = torch.Generator().manual_seed(rows)
    x, res = (torch.randn(rows, 320, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(320, generator=g)).to(dtype)
    assert small_ops.usable(x, res, w)
    out, summed = norm.fused_add_rms_norm(x, res, w, 1e-6)
    ref_out, ref_summed = _reference(lambda: norm.fused_add_rms_norm(x, res, w, 1e-6))
    plain, ref_plain = norm.rms_norm(x, w, 1e-5), _reference(lambda: norm.rms_norm(x, w, 1e-5))
    assert torch.equal(summed, ref_summed)
    if dtype == torch.bfloat16:  # every rounding at the reference's place: bit-equal
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0.0079)  # an ulp where a sum ties
        assert (out != ref_out).float().mean() < 0.01
        assert (plain != ref_plain).float().mean() < 0.01
    else:  # the mean of squares is summed in another order: an ulp or two
        torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(plain, ref_plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("tokens", "num_threads"), [(1, 1), (5, 1), (200, 2)])
def test_rope_matches_reference(
    dtype: torch.dtype, tokens: int, num_threads: int, threads: None
) -> None:
    torch.set_num_threads(num_threads)
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, 12 * 32, generator=g).to(dtype)
    x = qkv[:, : 10 * 32].view(tokens, 10, 32)  # q and k heads of a fused qkv: strided rows
    cos, sin = rope.rope_cos_sin(torch.arange(tokens) * 7, rope.rope_inv_freq(32, 10000.0))
    cos, sin = cos.to(dtype), sin.to(dtype)
    out = rope.apply_rope(x, cos, sin)
    ref = _reference(lambda: rope.apply_rope(x, cos, sin))
    if dtype == torch.bfloat16:
        assert torch.equal(out, ref)
    else:  # a fused multiply-add may skip one rounding
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_other_dtypes_and_devices_fall_back() -> None:
    x = torch.randn(2, 8, dtype=torch.float16)
    assert not small_ops.usable(x)
    assert not small_ops.usable(torch.randn(2, 8), x)


@pytest.mark.skipif(not small_ops.has_silu_mul(), reason="no AVX-512 here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "num_threads"), [(1, 1), (3, 1), (100, 2)])
def test_silu_and_mul_matches_reference(
    dtype: torch.dtype, rows: int, num_threads: int, threads: None
) -> None:
    from batonserve.kernels.activation import silu_and_mul

    torch.set_num_threads(num_threads)
    g = torch.Generator().manual_seed(rows)
    gu = (4 * torch.randn(rows, 2 * 1411, generator=g)).to(dtype)  # a width with a vector tail
    gu[0, :3] = torch.tensor([float("nan"), 100.0, -100.0])
    out = silu_and_mul(gu)
    ref = _reference(lambda: silu_and_mul(gu))
    assert out[0, 0].isnan()
    # silu(-100) ~ -4e-42: exp's input is clamped at -87, so ~1e-36 instead; zero for all uses.
    out, ref = out[:, 1:], ref[:, 1:]
    if dtype == torch.bfloat16:  # exp's last bits rarely cross a bf16 rounding boundary
        assert (out != ref).float().mean() < 0.002
        torch.testing.assert_close(out, ref, atol=1e-30, rtol=0.0079)
    else:
        torch.testing.assert_close(out, ref, atol=1e-30, rtol=2e-6)

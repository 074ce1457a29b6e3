"""kernels/linear.py: oneDNN-packed weights, and the float32 copies bf16 weights may keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batonserve.kernels import linear as lin
from batonserve.kernels.cpu import gemv


@pytest.mark.parametrize("rows", [1, lin.FP32_MIN_ROWS - 1, lin.FP32_MIN_ROWS, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_copy_matches_a_float32_linear_on_the_bf16_values(
    rows: int, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gemv, "_enabled", False)  # one row: oneDNN's bf16 path, not the kernel
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    packed = lin.pack_weight(w, fp32_copy=True)
    assert packed is not None and packed.fp32 is not None
    assert packed.extra_bytes() == 96 * 64 * 4
    out = lin.linear(x, w, b, packed)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    exact = F.linear(x.float(), w.float(), b.float() if b is not None else None)
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=1e-2)  # bf16 output rounding
    wide = lin.linear(x, w, b, packed, fp32_out=True)
    if rows >= lin.FP32_MIN_ROWS:  # the fp32 GEMM: float32 out, no rounding to bf16
        assert wide.dtype == torch.float32
        torch.testing.assert_close(wide, exact, atol=1e-4, rtol=1e-4)
    else:  # few rows: the bf16 copy, bf16 out
        assert wide.dtype == torch.bfloat16


def test_no_fp32_copy_for_float32_weights_or_when_not_asked() -> None:
    w = torch.randn(8, 8)
    packed = lin.pack_weight(w, fp32_copy=True)
    assert packed is not None and packed.fp32 is None  # already float32
    packed = lin.pack_weight(w.bfloat16())
    assert packed is not None and packed.fp32 is None and packed.extra_bytes() == 0

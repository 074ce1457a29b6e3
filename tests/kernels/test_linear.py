"""kernels/linear.py and kernels/cpu/panel_gemm.py: bf16 weights in panels, float32 FMAs or bf16
dot products, against a float32 product of the same bf16 values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batonserve.kernels import linear as lin
from batonserve.kernels.cpu import panel_gemm

needs_kernel = pytest.mark.skipif(
    not panel_gemm.available(), reason="needs a C compiler and AVX-512 (the kernel's build)"
)


@needs_kernel
@pytest.mark.parametrize("layout", ["fp32_panels", "dot_panels"])
@pytest.mark.parametrize("shape", [(96, 64), (7, 33), (32, 1408), (100, 5), (33, 512)])
@pytest.mark.parametrize("rows", [4, 9, 12, 13, 40, 130])
@pytest.mark.parametrize("threads", [1, 2])
def test_panels_match_a_float32_product_of_the_bf16_values(
    layout: str, shape: tuple[int, int], rows: int, threads: int
) -> None:
    if not panel_gemm.available(layout == "dot_panels"):
        pytest.skip("the dot-product kernel needs AVX-512-BF16")
    n, k = shape
    gen = torch.Generator().manual_seed(rows * 7 + n)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    packed = lin.pack_weight(w, layout)
    assert packed is not None and packed.panels is not None and packed.native is None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            exact = F.linear(x.float(), w.float(), bias.float() if bias is not None else None)
            wide = lin.linear(x, w, bias, packed, fp32_out=True)  # float32: only order differs
            assert wide.dtype == torch.float32 and wide.shape == (rows, n)
            torch.testing.assert_close(wide, exact, atol=1e-4, rtol=1e-5)
            out = lin.linear(x, w, bias, packed)  # rounded to nearest even
            assert out.dtype == torch.bfloat16
            assert torch.equal(out, wide.to(torch.bfloat16))
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_panels_take_leading_dimensions_and_leave_float32_weights_to_onednn() -> None:
    w = torch.randn(40, 24).to(torch.bfloat16)
    packed = lin.pack_weight(w, "fp32_panels")
    x = torch.randn(2, 10, 24).to(torch.bfloat16)
    out = lin.linear(x, w, None, packed, fp32_out=True)
    torch.testing.assert_close(out, F.linear(x.float(), w.float()), atol=1e-4, rtol=1e-5)
    packed = lin.pack_weight(w.float(), "dot_panels")
    assert packed is not None and packed.panels is None and packed.native is not None
    packed = lin.pack_weight(w)
    assert packed is not None and packed.panels is None


@needs_kernel
def test_dot_panels_take_rows_at_an_odd_offset() -> None:
    """x read as int32 pairs: a view starting at an odd element is copied, not misread."""
    if not panel_gemm.available(dot=True):
        pytest.skip("the dot-product kernel needs AVX-512-BF16")
    w = torch.randn(40, 64).to(torch.bfloat16)
    x = torch.randn(1 + 5 * 64).to(torch.bfloat16)[1:].view(5, 64)
    assert x.storage_offset() % 2 == 1
    packed = lin.pack_weight(w, "dot_panels")
    out = lin.linear(x, w, None, packed, fp32_out=True)
    torch.testing.assert_close(out, F.linear(x.float(), w.float()), atol=1e-4, rtol=1e-5)

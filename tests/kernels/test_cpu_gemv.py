"""kernels/cpu/gemv.py: the bf16 kernel for 1-3 rows, against a float32 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batonserve.kernels import linear as lin
from batonserve.kernels.cpu import gemv

pytestmark = pytest.mark.skipif(
    gemv._library() is None, reason="needs a C compiler and AVX-512-BF16 (the kernel's build)"
)


@pytest.mark.parametrize("shape", [(1024, 512), (7, 33), (5, 100), (13, 1408), (1, 31), (4, 64)])
@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_a_float32_product_of_the_bf16_values(
    shape: tuple[int, int], rows: int, threads: int
) -> None:
    n, k = shape
    gen = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, generator=gen).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (None, b):
            assert gemv.applies(x, w, bias)
            exact = F.linear(x.float(), w.float(), bias.float() if bias is not None else None)
            wide = gemv.gemv(x, w, bias, fp32_out=True)  # fp32 sums: only the order differs
            assert wide.dtype == torch.float32
            torch.testing.assert_close(wide, exact, atol=1e-4, rtol=1e-5)
            out = gemv.gemv(x, w, bias, fp32_out=False)  # rounded to nearest even
            assert out.dtype == torch.bfloat16
            assert torch.equal(out, wide.to(torch.bfloat16))
    finally:
        torch.set_num_threads(before)


def test_applies_only_to_a_few_contiguous_bf16_rows() -> None:
    w = torch.randn(8, 16).to(torch.bfloat16)
    x = torch.randn(1, 16).to(torch.bfloat16)
    assert gemv.applies(x, w, None)
    assert gemv.applies(torch.randn(gemv.MAX_ROWS, 16).to(torch.bfloat16), w, None)
    assert not gemv.applies(torch.randn(gemv.MAX_ROWS + 1, 16).to(torch.bfloat16), w, None)
    assert not gemv.applies(x.float(), w.float(), None)
    assert not gemv.applies(x, w.t().contiguous().t(), None)
    assert not gemv.applies(x, w, torch.zeros(8))  # a float32 bias


def test_linear_takes_it_for_a_few_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = gemv.gemv

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(gemv, "gemv", spy)
    w = torch.randn(32, 64).to(torch.bfloat16)
    packed = lin.pack_weight(w)
    one = lin.linear(torch.randn(1, 64).to(torch.bfloat16), w, None, packed)
    assert calls == [1] and one.shape == (1, 32)
    lin.linear(torch.randn(3, 64).to(torch.bfloat16), w, None, packed)
    assert calls == [1, 1]
    lin.linear(torch.randn(gemv.MAX_ROWS + 1, 64).to(torch.bfloat16), w, None, packed)  # oneDNN
    assert calls == [1, 1]
    gemv.set_enabled(False)
    try:
        lin.linear(torch.randn(1, 64).to(torch.bfloat16), w, None, packed)
    finally:
        gemv.set_enabled(True)
    assert calls == [1, 1]

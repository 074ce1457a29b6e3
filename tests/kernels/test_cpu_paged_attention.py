"""The CPU C kernel (kernels/cpu) reads paged K/V in place and matches the torch reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from batonserve.kernels.attention import (
    decode_attention,
    paged_prefill_attention,
    plan_decode,
)
from batonserve.kernels.cpu import paged_attention as cpa

pytestmark = pytest.mark.skipif(not cpa.available(), reason="no C compiler for the CPU kernel")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _paged(
    lens: list[int], bs: int, hkv: int, d: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches [blocks, bs, Hkv, d] and a shuffled block table [B, max_blocks] int32."""
    g = torch.Generator().manual_seed(seed)
    per = [-(-n // bs) for n in lens]
    nblocks = sum(per) + 3
    k = torch.randn(nblocks, bs, hkv, d, generator=g).to(dtype)
    v = torch.randn(nblocks, bs, hkv, d, generator=g).to(dtype)
    order = (torch.randperm(nblocks - 1, generator=g) + 1).tolist()
    tables = torch.zeros(len(lens), max(per), dtype=torch.int32)
    for i, n in enumerate(per):
        tables[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    return k, v, tables


def _both(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """(C kernel result, torch reference result) of fn()."""
    fast = fn()
    cpa.set_cpu_kernels_enabled(False)
    try:
        ref = fn()
    finally:
        cpa.set_cpu_kernels_enabled(True)
    return fast, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_decode_matches_reference(dtype: torch.dtype, window: int | None, threads: int) -> None:
    lens = [1, 7, 16, 33, 50, 2, 19, 64]
    bs, h, hkv, d = 8, 8, 2, 32
    k, v, tables = _paged(lens, bs, hkv, d, dtype)
    q = torch.randn(len(lens), h, d).to(dtype)
    plan = plan_decode(tables, torch.tensor(lens, dtype=torch.int32), bs, sliding_window=window)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        (out, lse), (ref_out, ref_lse) = _both(
            lambda: decode_attention(q, k, v, plan, return_lse=True)
        )
    finally:
        torch.set_num_threads(before)
    assert out.dtype == dtype and out.shape == (len(lens), h, d)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert lse is not None and ref_lse is not None
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 4])
def test_prefill_with_cached_prefix_matches_reference(
    dtype: torch.dtype, window: int | None
) -> None:
    q_lens, k_lens = [3, 1, 6, 5], [9, 4, 6, 21]  # cached prefixes, bottom-right aligned
    bs, h, hkv, d = 4, 4, 4, 16  # no GQA here: group of one
    k, v, tables = _paged(k_lens, bs, hkv, d, dtype, seed=1)
    q = torch.randn(sum(q_lens), h, d).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    (out, lse), (ref_out, ref_lse) = _both(
        lambda: paged_prefill_attention(
            q,
            k,
            v,
            cu,
            torch.tensor(k_lens, dtype=torch.int32),
            tables,
            sliding_window=window,
            return_lse=True,
        )
    )
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert lse is not None and ref_lse is not None
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


def test_reads_the_cache_in_place_through_a_strided_query() -> None:
    """q may be a column slice of the fused qkv projection (row stride > H * d)."""
    lens = [5, 12]
    k, v, tables = _paged(lens, 4, 2, 8, torch.float32)
    qkv = torch.randn(2, 4 * 8 + 2 * 2 * 8)
    q = qkv[:, : 4 * 8].view(2, 4, 8)
    assert not q.is_contiguous()
    plan = plan_decode(tables, torch.tensor(lens, dtype=torch.int32), 4)
    (out, _), (ref, _) = _both(lambda: decode_attention(q, k, v, plan))
    torch.testing.assert_close(out, ref)


def test_row_without_keys_gives_zero_and_neg_inf() -> None:
    k, v, tables = _paged([4], 4, 1, 8, torch.float32)
    q = torch.randn(2, 2, 8)
    out, lse = cpa.paged_attention_cpu(
        q, k, v, tables, torch.tensor([0, 0]), torch.tensor([-1, 3]), return_lse=True
    )
    assert lse is not None
    assert torch.equal(out[0], torch.zeros(2, 8)) and bool(torch.isneginf(lse[0]).all())
    assert bool(torch.isfinite(lse[1]).all())


def test_unsupported_inputs_take_the_reference() -> None:
    k, _, _ = _paged([4], 4, 1, 8, torch.float32)
    assert not cpa.supports(torch.randn(1, 2, 8, dtype=torch.float64), k.double())
    assert not cpa.supports(torch.randn(1, 2, 8, dtype=torch.bfloat16), k)  # dtypes differ


def test_no_compiler_means_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a C compiler the build gives up quietly and callers keep the reference."""
    from batonserve.kernels.cpu import native

    monkeypatch.setattr(native.shutil, "which", lambda _name: None)
    assert native.build("never_built", "int f(void) { return 1; }") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("h", "hkv", "d", "bs"), [(8, 4, 64, 16), (4, 4, 32, 32), (12, 2, 16, 8)])
def test_fast_kernel_matches_generic(dtype: torch.dtype, h: int, hkv: int, d: int, bs: int) -> None:
    """The AVX-512 kernel (group of 2 has its own loop; tiles of 16 split blocks of 32) equals
    the generic C kernel to float rounding, LSE included, with a window and an empty row; with
    rows enough for a task per row (all KV heads) and with few rows (a task per KV head)."""
    lens = [0, 1, 15, 16, 17, 40, 70, 33]
    k, v, tables = _paged([max(n, 1) for n in lens], bs, hkv, d, dtype)
    q = torch.randn(len(lens), h, d).to(dtype)
    for window, rows in ((None, 8), (20, 8), (None, 3), (20, 2)):
        args = (q[-rows:], k, v, tables, torch.arange(8)[-rows:], torch.tensor(lens[-rows:]) - 1)
        fast = cpa.paged_attention_cpu(*args, sliding_window=window, return_lse=True)
        cpa.set_fast_kernels_enabled(False)
        try:
            ref = cpa.paged_attention_cpu(*args, sliding_window=window, return_lse=True)
        finally:
            cpa.set_fast_kernels_enabled(True)
        torch.testing.assert_close(
            fast[0].float(), ref[0].float(), atol=TOL[dtype], rtol=TOL[dtype]
        )
        torch.testing.assert_close(fast[1], ref[1], atol=1e-4, rtol=1e-4)

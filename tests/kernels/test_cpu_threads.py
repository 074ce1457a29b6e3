"""The C kernels split work over torch's own OpenMP threads: one runtime in the process, and the
same bits whatever the thread count (each row or task is computed whole by one thread)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from batonserve.kernels.cpu import native, paged_attention, small_ops


def _loaded_runtimes() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "libgomp" in line.split()[-1]}


def test_kernels_share_torchs_openmp_runtime() -> None:
    gomp = native.openmp_runtime()
    if gomp is None:
        pytest.skip("this torch has no GNU OpenMP runtime loaded (the kernels run single-threaded)")
    assert small_ops._library() is not None and paged_attention._library() is not None
    assert _loaded_runtimes() == {gomp}  # not a second libgomp beside torch's


def test_failed_openmp_build_falls_back_to_one_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An OpenMP build that fails (here: a runtime path that does not exist) still gives a
    working library, single-threaded, rather than the torch reference."""
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)
    monkeypatch.setattr(native, "openmp_runtime", lambda: "/nonexistent/libgomp.so.1")
    src = (
        "#include <stdint.h>\n"
        + native.SPLIT_C
        + (
            "int64_t total(int64_t n, int64_t nth) {"
            " int64_t s = 0; SPLIT(0, n, nth, s += b - a); return s; }"
        )
    )
    path = native.build("split_fallback", src)
    assert path is not None
    lib = ctypes.CDLL(str(path))
    lib.total.restype = ctypes.c_int64
    assert lib.total(ctypes.c_int64(10), ctypes.c_int64(2)) == 10


def _threads_agree(fn: Callable[[], tuple[torch.Tensor, ...]]) -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        two = fn()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_ops_same_bits_on_one_or_two_threads(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 512, generator=g).to(dtype)  # above the threading threshold
    res, w = torch.randn_like(x.float()).to(dtype), torch.randn(512, generator=g).to(dtype)
    cos, sin = torch.randn(300, 64, generator=g).to(dtype), torch.randn(300, 64).to(dtype)
    heads = x.view(300, 8, 64)

    def run() -> tuple[torch.Tensor, ...]:
        out, summed = small_ops.rms_norm(x, w, 1e-6, res)
        assert summed is not None
        return out, summed, small_ops.rope(heads, cos, sin)

    _threads_agree(run)


def test_attention_same_bits_on_one_or_two_threads() -> None:
    g = torch.Generator().manual_seed(1)
    seqs, bs, hkv, h, d = 24, 16, 4, 8, 64
    blocks = 8
    k = torch.randn(seqs * blocks, bs, hkv, d, generator=g).bfloat16()
    v = torch.randn(seqs * blocks, bs, hkv, d, generator=g).bfloat16()
    tables = torch.arange(seqs * blocks, dtype=torch.int32).view(seqs, blocks)
    q = torch.randn(seqs, h, d, generator=g).bfloat16()
    row_seq = torch.arange(seqs)
    row_last = torch.randint(0, blocks * bs, (seqs,), generator=g)

    def run() -> tuple[torch.Tensor, ...]:
        out, lse = paged_attention.paged_attention_cpu(
            q, k, v, tables, row_seq, row_last, return_lse=True
        )
        assert lse is not None
        return out, lse

    _threads_agree(run)

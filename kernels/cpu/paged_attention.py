"""Paged attention on CPU reading K/V blocks in place (the C kernel of paged_attention_src.py).

Each query row names its sequence (a row of the block table) and the position of the last key
it sees; it attends to keys [last - window + 1, last] of that sequence, read straight from the
paged cache. Decode is one row per sequence; a prefill chunk is several rows of one sequence.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any

import torch

from batonserve.kernels.cpu.native import load
from batonserve.kernels.cpu.paged_attention_src import SOURCE

_FUNCS = {
    torch.float32: "paged_attention_f32",
    torch.bfloat16: "paged_attention_bf16",
    torch.float16: "paged_attention_f16",
}
# The AVX-512 kernels (one pass, online softmax over 16-key tiles): head_dim % 16 == 0 only.
_FAST = {
    torch.float32: "paged_attention_fast_f32",
    torch.bfloat16: "paged_attention_fast_bf16",
    torch.float16: "paged_attention_fast_f16",
}
_I64, _F32, _P = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
_ARGTYPES = [_P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _P, _P]
_ARGTYPES += [_I64, _I64, _I64, _I64, _I64, _F32, _I64, _I64, _I64, _I64]
MAX_GROUP = 64  # query heads per KV head the kernel's stack arrays hold
_enabled = True
_fast_enabled = True


def set_cpu_kernels_enabled(enabled: bool) -> None:
    """Turn the C fast path on or off process-wide (off: the torch reference, for A/B checks)."""
    global _enabled
    _enabled = enabled


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    lib = load("paged_attention", SOURCE)
    if lib is not None:
        lib.has_fast_kernels.restype = _I64
        names = list(_FUNCS.values()) + (list(_FAST.values()) if lib.has_fast_kernels() else [])
        for name in names:
            fn = getattr(lib, name)
            fn.argtypes = _ARGTYPES
            fn.restype = None
    return lib


def _use_fast(lib: ctypes.CDLL, head_dim: int) -> bool:
    return _fast_enabled and head_dim % 16 == 0 and bool(lib.has_fast_kernels())


def set_fast_kernels_enabled(enabled: bool) -> None:
    """Use the AVX-512 kernels where built (default) or always the generic C one (A/B checks)."""
    global _fast_enabled
    _fast_enabled = enabled


def available() -> bool:
    """True when the C kernel is enabled and built on this machine."""
    return _enabled and _library() is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """True when the C kernel can take these tensors (CPU, same float dtype, GQA group <= 64)."""
    return (
        _enabled
        and q.device.type == "cpu"
        and k_cache.device.type == "cpu"
        and q.dtype in _FUNCS
        and k_cache.dtype == q.dtype
        and q.shape[1] % k_cache.shape[-2] == 0
        and q.shape[1] // k_cache.shape[-2] <= MAX_GROUP
        and _library() is not None
    )


def paged_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    row_seq: torch.Tensor,
    row_last: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    return_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q [T, H, d]; caches [blocks, bs, Hkv, d]; block_tables [B, max_blocks] int32;
    row_seq / row_last [T] int64 (sequence of each row, its last visible key; -1: none).

    Returns (out [T, H, d] in q's dtype, lse [T, H] float32 or None); a row without keys gives
    zeros and lse -inf. Callers check `supports` first.
    """
    lib = _library()
    assert lib is not None
    t, num_heads, head_dim = q.shape
    num_kv, block_size = k_cache.shape[-2], k_cache.shape[1]
    if q.stride(2) != 1:
        q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()  # views of one cache: no copy
    tables = block_tables.to(torch.int32).contiguous()
    row_seq = row_seq.to(torch.int64).contiguous()
    row_last = row_last.to(torch.int64).contiguous()
    out = torch.empty(t, num_heads, head_dim, dtype=q.dtype)
    lse = torch.empty(t, num_heads, dtype=torch.float32) if return_lse else None
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    fn: Any = getattr(lib, (_FAST if _use_fast(lib, head_dim) else _FUNCS)[q.dtype])
    head: tuple[Any, ...] = (q.data_ptr(), q.stride(0), q.stride(1))
    head += (k_cache.data_ptr(), v_cache.data_ptr())
    head += (tables.data_ptr(), tables.stride(0) if tables.dim() == 2 else 0)
    head += (row_seq.data_ptr(), row_last.data_ptr(), out.data_ptr())
    head += (lse.data_ptr() if lse is not None else None,)
    shape: tuple[Any, ...] = (num_heads, num_kv, head_dim, block_size, sliding_window or 0, scale)
    # A task is a row and `hs` KV heads: all of them (whole contiguous key rows) where the rows
    # alone give every thread 4+ tasks, else one. Split over torch's threads (native.SPLIT_C).
    threads = torch.get_num_threads()
    hs = num_kv if t >= 4 * threads else 1
    tasks = t * (num_kv // hs)
    fn(*head, *shape, hs, 0, tasks, min(threads, tasks // 4 or 1))
    return out, lse

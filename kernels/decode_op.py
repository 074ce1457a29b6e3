"""One decode attention step as a torch custom op: write the new K/V, attend over the paged cache.

A compiled graph (torch.compile on CPU, CUDA graphs on GPU) cannot trace a ctypes call or a
Triton launch with Python-side planning, so the whole "write K/V, then attend" of one layer is
one opaque op: `torch.ops.batonserve.decode_attention_kv`. It mutates the caches (declared, so
the compiler orders it) and returns the attention output. Inside it runs the same kernels as the
eager path: the C kernel on CPU, the Triton one on CUDA, the torch reference otherwise. Every
argument is a tensor or a plain number, with shapes fixed by the batch bucket, as CUDA graph
capture needs (the block table is padded to a fixed width).
"""

from __future__ import annotations

import torch

from batonserve.kernels.attention import decode_attention, plan_decode
from batonserve.kernels.cpu.paged_attention import paged_attention_cpu, supports


@torch.library.custom_op("batonserve::decode_attention_kv", mutates_args=("k_cache", "v_cache"))
def decode_attention_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    window: int,
    block_size: int,
) -> torch.Tensor:
    """q [B, H, d], k/v [B, Hkv, d] new keys; caches [blocks, bs, Hkv, d]; slot_mapping [B] int64;
    block_tables [B, W] int32; context_lens [B] int32 (keys incl. the new one). window 0: none.
    Returns out [B, H, d]."""
    kvh, d = k.shape[1], k.shape[2]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v)
    win = window or None
    if supports(q, k_cache):
        last = context_lens.to(torch.int64) - 1
        rows = torch.arange(q.shape[0])
        out, _ = paged_attention_cpu(
            q, k_cache, v_cache, block_tables, rows, last, sliding_window=win
        )
        return out
    # max_context_len from the table's width, not lens.max(): no host sync, so CUDA graphs capture.
    width = block_tables.shape[1] * block_size
    plan = plan_decode(
        block_tables, context_lens, block_size, sliding_window=win, max_context_len=width
    )
    return decode_attention(q, k_cache, v_cache, plan)[0].clone()


@decode_attention_kv.register_fake
def _(q, k, v, k_cache, v_cache, slot_mapping, block_tables, context_lens, window, block_size):  # type: ignore[no-untyped-def]
    return torch.empty_like(q)

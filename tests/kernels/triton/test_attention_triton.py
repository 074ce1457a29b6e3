"""Triton attention kernels (prefill with cached prefix, split-K paged decode, LSE merge) vs the references."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import pytest
import torch

from batonserve.kernels.attention import (
    DecodePlan,
    PrefillPlan,
    merge_attention_states_many,
    plan_decode,
    plan_prefill,
    prefill_attention,
)
from batonserve.kernels.attention import decode_attention as ref_decode
from batonserve.kernels.triton.decode_attention import decode_attention_triton, lean_num_splits
from batonserve.kernels.triton.merge import merge_attention_states_many_triton
from batonserve.kernels.triton.prefill_attention import prefill_attention_triton

torch.set_num_threads(1)

PlanT = TypeVar("PlanT", PrefillPlan, DecodePlan)

# (atol, rtol) per dtype: fp32 tight; half types round inputs/outputs differently from the reference.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}
LSE_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _cu(lens: list[int], device: torch.device) -> torch.Tensor:
    """Prefix sums [B + 1] int32."""
    return torch.tensor(
        [0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device
    )


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare in float32 (inf positions must match exactly)."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=atol, rtol=rtol)


def _paged_cache(
    k_lens: list[int],
    hkv: int,
    d: int,
    bs: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shuffled paged cache holding each sequence's keys: (k_cache, v_cache, block_tables)."""
    nb = [-(-n // bs) for n in k_lens]
    total = sum(nb) + 2
    perm = torch.randperm(total, generator=gen)[: sum(nb)]  # scattered physical blocks
    tables = torch.zeros(len(k_lens), max(nb), dtype=torch.int32)
    at = 0
    for b, n in enumerate(nb):
        tables[b, :n] = perm[at : at + n]
        at += n
    k_cache = torch.randn(total, bs, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(total, bs, hkv, d, generator=gen).to(dtype)
    return k_cache.to(device), v_cache.to(device), tables.to(device)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q_lens", "k_lens", "window", "causal"),
    [
        ([5, 3], [5, 3], None, True),  # plain causal varlen
        ([2, 4, 1], [9, 4, 7], None, True),  # cached prefixes, bottom-right aligned
        ([6, 3], [10, 3], 4, True),  # sliding window
        ([4, 2], [3, 5], None, True),  # more queries than keys: first rows see nothing
        ([3, 2], [6, 4], None, False),  # non-causal (encoder / cross)
    ],
)
def test_prefill_flat_matches_reference(
    device: torch.device,
    dtype: torch.dtype,
    q_lens: list[int],
    k_lens: list[int],
    window: int | None,
    causal: bool,
) -> None:
    """Flat varlen keys, GQA 4:2, with LSE: same out and lse as the torch reference."""
    gen = torch.Generator().manual_seed(0)
    h, hkv, d = 4, 2, 16
    q = torch.randn(sum(q_lens), h, d, generator=gen).to(dtype).to(device)
    k = torch.randn(sum(k_lens), hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(sum(k_lens), hkv, d, generator=gen).to(dtype).to(device)
    plan = plan_prefill(
        _cu(q_lens, device),
        torch.tensor(k_lens, device=device),
        k_starts=_cu(k_lens, device)[:-1],
        causal=causal,
        sliding_window=window,
    )
    ref_out, ref_lse = prefill_attention(
        q.cpu(), k.cpu(), v.cpu(), _cpu_plan(plan), return_lse=True
    )
    out, lse = prefill_attention_triton(q, k, v, plan, return_lse=True)
    _close(out, ref_out, dtype)
    assert lse is not None and ref_lse is not None
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=LSE_TOL[dtype], rtol=LSE_TOL[dtype])
    out2, none = prefill_attention_triton(q, k, v, plan)  # without LSE: same output
    assert none is None
    torch.testing.assert_close(out2, out)


def _cpu_plan(plan: PlanT) -> PlanT:
    """The same plan with its tensors on CPU (the reference runs there)."""
    moved = {
        f.name: getattr(plan, f.name).cpu()
        for f in dataclasses.fields(plan)  # type: ignore[arg-type]
        if isinstance(getattr(plan, f.name), torch.Tensor)
    }
    return dataclasses.replace(plan, **moved)  # type: ignore[type-var]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_paged_prefix_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    """Cached prefix + new chunk read from a shuffled paged cache (block size 4), GQA 6:2, scale given."""
    gen = torch.Generator().manual_seed(1)
    q_lens, ctx = [3, 5, 1], [11, 5, 6]
    h, hkv, d, bs = 6, 2, 16, 4
    k_cache, v_cache, tables = _paged_cache(ctx, hkv, d, bs, dtype, device, gen)
    q = torch.randn(sum(q_lens), h, d, generator=gen).to(dtype).to(device)
    plan = plan_prefill(
        _cu(q_lens, device), torch.tensor(ctx, device=device), block_tables=tables, block_size=bs
    )
    ref_out, ref_lse = prefill_attention(
        q.cpu(), k_cache.cpu(), v_cache.cpu(), _cpu_plan(plan), scale=0.3, return_lse=True
    )
    out, lse = prefill_attention_triton(q, k_cache, v_cache, plan, scale=0.3, return_lse=True)
    _close(out, ref_out, dtype)
    assert lse is not None and ref_lse is not None
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=LSE_TOL[dtype], rtol=LSE_TOL[dtype])


def test_prefill_subset_plan_with_q_starts(device: torch.device) -> None:
    """A plan over a subset of the batch's sequences (q_starts) packs outputs in plan order."""
    gen = torch.Generator().manual_seed(2)
    h, hkv, d = 2, 1, 16
    q = torch.randn(12, h, d, generator=gen).to(device)
    k = torch.randn(20, hkv, d, generator=gen).to(device)
    v = torch.randn(20, hkv, d, generator=gen).to(device)
    plan = plan_prefill(
        _cu([3, 2], device),
        torch.tensor([7, 2], device=device),
        k_starts=torch.tensor([10, 0], device=device),
        q_starts=torch.tensor([8, 1], device=device),
    )
    ref_out, _ = prefill_attention(q.cpu(), k.cpu(), v.cpu(), _cpu_plan(plan))
    out, _ = prefill_attention_triton(q, k, v, plan)
    _close(out, ref_out, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("ctx", "window", "splits"),
    [
        ([1, 7, 20], None, 1),  # one split: no merge needed
        ([1, 7, 20], None, 3),  # split-K with an empty split for the short sequences
        ([33], None, 5),  # one long sequence over many splits (the Lean Attention case)
        ([9, 21], 6, 4),  # sliding window: early splits see nothing
    ],
)
def test_decode_matches_reference(
    device: torch.device, dtype: torch.dtype, ctx: list[int], window: int | None, splits: int
) -> None:
    """Paged split-K decode, GQA 8:2 (4 query heads per program), vs the reference's own split."""
    gen = torch.Generator().manual_seed(3)
    h, hkv, d, bs = 8, 2, 16, 4
    k_cache, v_cache, tables = _paged_cache(ctx, hkv, d, bs, dtype, device, gen)
    q = torch.randn(len(ctx), h, d, generator=gen).to(dtype).to(device)
    plan = plan_decode(tables, torch.tensor(ctx, device=device), bs, sliding_window=window)
    ref_out, ref_lse = ref_decode(
        q.cpu(), k_cache.cpu(), v_cache.cpu(), _cpu_plan(plan), return_lse=True
    )
    out, lse = decode_attention_triton(
        q, k_cache, v_cache, plan, return_lse=True, num_splits=splits
    )
    _close(out, ref_out, dtype)
    assert lse is not None and ref_lse is not None
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=LSE_TOL[dtype], rtol=LSE_TOL[dtype])


def test_decode_head_dim_not_power_of_two(device: torch.device) -> None:
    """head_dim 24 (padded to 32 inside the kernel), block size 3, MHA."""
    gen = torch.Generator().manual_seed(4)
    ctx, h, d, bs = [5, 13], 3, 24, 3
    k_cache, v_cache, tables = _paged_cache(ctx, h, d, bs, torch.float32, device, gen)
    q = torch.randn(2, h, d, generator=gen).to(device)
    plan = plan_decode(tables, torch.tensor(ctx, device=device), bs)
    ref_out, _ = ref_decode(q.cpu(), k_cache.cpu(), v_cache.cpu(), _cpu_plan(plan))
    out, _ = decode_attention_triton(q, k_cache, v_cache, plan, num_splits=2)
    _close(out, ref_out, torch.float32)


def test_lean_num_splits_off_gpu() -> None:
    """Off CUDA the split count follows the context (one per 256 keys, at most 8)."""
    cpu = torch.device("cpu")
    assert lean_num_splits(1, 8, 100, cpu) == 1
    assert lean_num_splits(1, 8, 1000, cpu) == 4
    assert lean_num_splits(4, 8, 100_000, cpu) == 8


def test_lean_num_splits_fills_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (132 SMs faked): one long sequence splits to ~2 waves; a big batch needs no split."""
    import batonserve.kernels.triton.decode_attention as dec

    monkeypatch.setattr(dec, "_num_sms", lambda index: 132)
    gpu = torch.device("cuda", 0)
    assert lean_num_splits(1, 8, 131072, gpu) == 33  # 8 KV heads x 33 splits >= 2 x 132 programs
    assert lean_num_splits(1, 8, 1000, gpu) == 16  # capped: each split keeps >= 64 keys
    assert lean_num_splits(256, 8, 4096, gpu) == 1  # 2048 programs already fill the GPU


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    """S=3 partials with -inf rows (a partial saw no key; a row where none did)."""
    gen = torch.Generator().manual_seed(5)
    outs = torch.randn(3, 4, 5, 16, generator=gen).to(dtype)
    lses = torch.randn(3, 4, 5, generator=gen) * 3
    lses[0, 1, 2] = float("-inf")
    lses[:, 3, 4] = float("-inf")
    outs[:, 3, 4] = 0
    ref_out, ref_lse = merge_attention_states_many(outs, lses)
    out, lse = merge_attention_states_many_triton(outs.to(device), lses.to(device))
    assert out.dtype == dtype and not torch.isnan(out).any()
    _close(out, ref_out, dtype)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)
    assert lse[3, 4] == float("-inf") and (out[3, 4] == 0).all()

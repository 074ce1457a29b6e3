"""Attention kernels against naive float64 loops: varlen prefill with prefix, paged split-K decode, LSE merge."""

from __future__ import annotations

import math

import pytest
import torch

from batonserve.kernels.attention import (
    merge_attention_states,
    paged_decode_attention,
    paged_prefill_attention,
    varlen_attention,
)

torch.set_num_threads(1)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in float64, query by query: q [n, H, d], k/v [m, Hkv, d] -> (out, lse)."""
    n, h, d = q.shape
    m, hkv, _ = k.shape
    out = torch.zeros(n, h, d, dtype=torch.float64)
    lse = torch.full((n, h), -math.inf, dtype=torch.float64)
    for i in range(n):
        pos = m - n + i  # bottom-right alignment
        for head in range(h):
            kh = head // (h // hkv)
            keys = [
                j
                for j in range(m)
                if (not causal or j <= pos) and (window is None or not causal or j > pos - window)
            ]
            if not keys:
                continue
            s = torch.stack([q[i, head].double() @ k[j, kh].double() for j in keys]) / math.sqrt(d)
            lse[i, head] = torch.logsumexp(s, 0)
            p = torch.softmax(s, 0)
            out[i, head] = sum(p[t] * v[j, kh].double() for t, j in enumerate(keys))
    return out, lse


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(
    ("q_lens", "k_lens", "window"),
    [
        ([5], [5], None),  # plain causal, no prefix
        ([3, 1, 6], [3, 1, 6], None),  # varlen, no prefix
        ([2, 4, 1], [9, 4, 7], None),  # cached prefixes, bottom-right aligned
        ([6, 3], [10, 3], 4),  # sliding window
    ],
)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_varlen_prefill_matches_naive(
    q_lens: list[int], k_lens: list[int], window: int | None, heads: tuple[int, int]
) -> None:
    h, hkv = heads
    d = 8
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(q_lens), h, d, generator=g)
    k = torch.randn(sum(k_lens), hkv, d, generator=g)
    v = torch.randn(sum(k_lens), hkv, d, generator=g)
    for return_lse in (False, True):
        out, lse = varlen_attention(
            q, k, v, _cu(q_lens), _cu(k_lens), sliding_window=window, return_lse=return_lse
        )
        qs, ks = _cu(q_lens).tolist(), _cu(k_lens).tolist()
        for b in range(len(q_lens)):
            ref, ref_lse = naive_attention(
                q[qs[b] : qs[b + 1]], k[ks[b] : ks[b + 1]], v[ks[b] : ks[b + 1]], window=window
            )
            torch.testing.assert_close(out[qs[b] : qs[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)
            if return_lse:
                assert lse is not None and lse.dtype == torch.float32
                torch.testing.assert_close(
                    lse[qs[b] : qs[b + 1]].double(), ref_lse, atol=1e-5, rtol=1e-5
                )


def test_non_causal_and_empty_rows_give_zero_and_neg_inf() -> None:
    """Non-causal attends everything; a query with no key (k_len 0) gives out 0, lse -inf, no NaN."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 2, 4, generator=g)
    k = torch.randn(3, 1, 4, generator=g)
    v = torch.randn(3, 1, 4, generator=g)
    out, lse = varlen_attention(q, k, v, _cu([3, 2]), _cu([3, 0]), causal=False, return_lse=True)
    ref, ref_lse = naive_attention(q[:3], k, v, causal=False)
    torch.testing.assert_close(out[:3].double(), ref, atol=1e-5, rtol=1e-5)
    assert lse is not None
    torch.testing.assert_close(lse[:3].double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    assert torch.isneginf(lse[3:]).all()


def _paged(
    keys: list[torch.Tensor], block_size: int, num_blocks: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter each sequence's [len, Hkv, d] into a shuffled paged cache; return (cache, tables)."""
    hkv, d = keys[0].shape[1:]
    cache = torch.randn(num_blocks, block_size, hkv, d, generator=torch.Generator().manual_seed(99))
    perm = torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1
    need = [-(-len(x) // block_size) for x in keys]
    tables = torch.zeros(len(keys), max(need) + 2, dtype=torch.int32)  # extra padding columns
    nxt = 0
    for b, x in enumerate(keys):
        for blk in range(need[b]):
            bid = int(perm[nxt])
            nxt += 1
            tables[b, blk] = bid
            chunk = x[blk * block_size : (blk + 1) * block_size]
            cache[bid, : len(chunk)] = chunk
    return cache, tables


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_paged_decode_split_k_matches_naive(block_size: int, num_splits: int) -> None:
    h, hkv, d = 4, 2, 8
    lens = [1, 7, 33, 20]
    g = torch.Generator().manual_seed(block_size * 10 + num_splits)
    ks = [torch.randn(n, hkv, d, generator=g) for n in lens]
    vs = [torch.randn(n, hkv, d, generator=g) for n in lens]
    q = torch.randn(len(lens), h, d, generator=g)
    k_cache, tables = _paged(ks, block_size, 64, seed=1)
    v_cache, _ = _paged(vs, block_size, 64, seed=1)
    ctx = torch.tensor(lens, dtype=torch.int32)
    for window in (None, 5):
        out, lse = paged_decode_attention(
            q,
            k_cache,
            v_cache,
            tables,
            ctx,
            num_splits=num_splits,
            sliding_window=window,
            return_lse=True,
        )
        assert lse is not None
        for b in range(len(lens)):
            ref, ref_lse = naive_attention(q[b : b + 1], ks[b], vs[b], window=window)
            torch.testing.assert_close(out[b].double(), ref[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lse[b].double(), ref_lse[0], atol=1e-5, rtol=1e-5)


def test_paged_prefill_with_cached_prefix_matches_naive() -> None:
    h, hkv, d, bs = 4, 2, 8, 4
    k_lens, q_lens = [10, 3, 6], [2, 3, 1]
    g = torch.Generator().manual_seed(3)
    ks = [torch.randn(n, hkv, d, generator=g) for n in k_lens]
    vs = [torch.randn(n, hkv, d, generator=g) for n in k_lens]
    q = torch.randn(sum(q_lens), h, d, generator=g)
    k_cache, tables = _paged(ks, bs, 32, seed=2)
    v_cache, _ = _paged(vs, bs, 32, seed=2)
    out, lse = paged_prefill_attention(
        q, k_cache, v_cache, _cu(q_lens), torch.tensor(k_lens), tables, return_lse=True
    )
    qs = _cu(q_lens).tolist()
    assert lse is not None
    for b in range(3):
        ref, ref_lse = naive_attention(q[qs[b] : qs[b + 1]], ks[b], vs[b])
        torch.testing.assert_close(out[qs[b] : qs[b + 1]].double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[qs[b] : qs[b + 1]].double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_lse_merge_equals_attention_over_union() -> None:
    """Attention over keys A then B, merged by LSE, equals attention over A ∪ B."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 2, 8, generator=g)
    k = torch.randn(10, 2, 8, generator=g)
    v = torch.randn(10, 2, 8, generator=g)
    a = naive_attention(q, k[:4], v[:4], causal=False)
    b = naive_attention(q, k[4:], v[4:], causal=False)
    full, full_lse = naive_attention(q, k, v, causal=False)
    out, lse = merge_attention_states(a[0].float(), a[1].float(), b[0].float(), b[1].float())
    assert lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), full_lse, atol=1e-5, rtol=1e-5)


def test_lse_merge_guards_rows_without_keys() -> None:
    """-inf on one side passes the other through; -inf on both gives 0 and -inf, never NaN."""
    out_a = torch.randn(2, 3, 4)
    out_b = torch.randn(2, 3, 4)
    lse_a = torch.tensor([[0.5, -math.inf, -math.inf], [1.0, 2.0, -math.inf]])
    lse_b = torch.tensor([[-math.inf, 0.3, -math.inf], [-math.inf, -math.inf, -math.inf]])
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0, 0], out_a[0, 0])
    torch.testing.assert_close(out[0, 1], out_b[0, 1])
    torch.testing.assert_close(out[1, :2], out_a[1, :2])
    assert torch.equal(out[:, 2], torch.zeros(2, 4))
    assert torch.isneginf(lse[:, 2]).all()
    torch.testing.assert_close(lse[1, :2], lse_a[1, :2])


def test_prefill_bf16_close_to_float32() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(7, 4, 16, generator=g)
    k = torch.randn(9, 2, 16, generator=g)
    v = torch.randn(9, 2, 16, generator=g)
    ref, _ = varlen_attention(q, k, v, _cu([3, 4]), _cu([4, 5]))
    out, _ = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), _cu([3, 4]), _cu([4, 5]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)

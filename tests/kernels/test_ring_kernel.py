"""Block attention by global positions (kernels/ring.py) against a float64 reference."""

from __future__ import annotations

import math

import torch

from batonserve.kernels.attention import merge_attention_states
from batonserve.kernels.ring import block_attention, plan_block


def _ref(q, k, v, qp, qs, kp, ks):  # type: ignore[no-untyped-def]
    """Float64 masked attention: allowed iff same request and key pos <= query pos."""
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(q.shape[-1])
    allowed = (qs[:, None] == ks[None, :]) & (kp[None, :] <= qp[:, None])
    s = s.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [H, q]
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", p, v), lse.T


def test_block_matches_reference_striped_positions_and_unsorted_keys() -> None:
    """Strided queries, keys in shuffled order from two requests, GQA 4:2, tiles of 8."""
    g = torch.Generator().manual_seed(0)
    qp = torch.cat([torch.arange(1, 60, 3), torch.arange(0, 20, 3)])
    qs = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(7, dtype=torch.long)])
    kp = torch.cat([torch.arange(0, 60), torch.arange(0, 20)])
    ks = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    perm = torch.randperm(80, generator=g)
    kp, ks = kp[perm], ks[perm]
    q = torch.randn(27, 4, 16, generator=g)
    k, v = torch.randn(80, 2, 16, generator=g), torch.randn(80, 2, 16, generator=g)
    plan = plan_block(qp, qs, kp, ks, tile=8)
    assert plan.k_order is not None  # shuffled keys: sorted once, then sliced per tile
    out, lse = block_attention(q, k, v, plan)
    ref_out, ref_lse = _ref(q, k, v, qp, qs, kp, ks)
    assert float((out.double() - ref_out).abs().max()) < 1e-5
    assert float((lse.double() - ref_lse).abs().max()) < 1e-5
    assert plan.num_pairs == int(((qs[:, None] == ks) & (kp <= qp[:, None])).sum())


def test_rows_without_keys_give_zero_and_minus_inf_and_merge_without_nan() -> None:
    """Queries before every key (a later KV block of the ring): out 0, lse -inf, merge stays finite."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 2, 8, generator=g)
    k, v = torch.randn(4, 1, 8, generator=g), torch.randn(4, 1, 8, generator=g)
    qp, kp = torch.arange(5), torch.arange(10, 14)
    zeros5, zeros4 = torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    plan = plan_block(qp, zeros5, kp, zeros4)
    assert plan.tiles == () and plan.num_pairs == 0
    out, lse = block_attention(q, k, v, plan)
    assert bool((out == 0).all()) and bool(torch.isneginf(lse).all())
    merged, mlse = merge_attention_states(out, lse, out, lse)
    assert not bool(torch.isnan(merged).any()) and bool(torch.isneginf(mlse).all())
    # Fully visible block: skips the mask (no q_pos/k_pos stored) and matches the reference.
    plan2 = plan_block(qp + 20, zeros5, kp, zeros4)
    assert all(t.q_pos is None for t in plan2.tiles)
    out2, _ = block_attention(q, k, v, plan2)
    ref2, _ = _ref(q, k, v, qp + 20, zeros5, kp, zeros4)
    assert float((out2.double() - ref2).abs().max()) < 1e-5


def test_causal_skip_halves_work_on_the_diagonal() -> None:
    """Keys a tile cannot see are not in it: a causal 512 block computes about half the pairs."""
    pos = torch.arange(512)
    seq = torch.zeros(512, dtype=torch.long)
    plan = plan_block(pos, seq, pos, seq, tile=64)
    computed = sum((t.q_end - t.q_start) * (t.k_range[1] - t.k_range[0]) for t in plan.tiles)
    assert computed < 0.6 * 512 * 512
    assert plan.num_pairs == 512 * 513 // 2


def test_row_chunking_bounds_scores_without_changing_results(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A tiny score budget forces row chunks inside every tile; results equal to float32 rounding.

    Not bit-identical: the BLAS may pick another kernel for a smaller row count (it does where
    the CPU lacks AMX), and that changes the last bit of a few sums.
    """
    import batonserve.kernels.ring as ring

    g = torch.Generator().manual_seed(2)
    pos, seq = torch.arange(300), torch.zeros(300, dtype=torch.long)
    q = torch.randn(300, 4, 8, generator=g)
    k, v = torch.randn(300, 2, 8, generator=g), torch.randn(300, 2, 8, generator=g)
    plan = plan_block(pos, seq, pos, seq, tile=128)
    want_out, want_lse = block_attention(q, k, v, plan)
    monkeypatch.setattr(ring, "MAX_SCORES", 4 * 50)
    out, lse = block_attention(q, k, v, plan)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=2e-6)

"""MoE kernels: softmax top-k routing with renormalization, permutation, grouped SwiGLU, combine."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batonserve.kernels.moe import (
    grouped_swiglu,
    moe_swiglu,
    permute_by_expert,
    topk_routing,
    unpermute_combine,
)

torch.set_num_threads(1)


def test_topk_routing_renormalizes_softmax() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    w, ids = topk_routing(logits, 2)
    assert ids.tolist() == [[1, 2], [2, 3]]
    p = torch.softmax(logits.double(), -1)
    ref = torch.stack([p[0, [1, 2]], p[1, [2, 3]]])
    torch.testing.assert_close(w.double(), ref / ref.sum(-1, keepdim=True))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    w_raw, _ = topk_routing(logits, 2, renormalize=False)
    torch.testing.assert_close(w_raw.double(), ref.float().double())


def test_permute_groups_by_expert_and_unpermute_inverts() -> None:
    hidden = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 3)  # row t holds t
    ids = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1], [3, 0]])
    permuted, perm = permute_by_expert(hidden, ids, 5)
    assert perm.counts.tolist() == [3, 2, 3, 2, 0]
    experts_of_rows = ids.reshape(-1)[perm.order]
    assert experts_of_rows.tolist() == sorted(experts_of_rows.tolist())
    # Each expert group lists its tokens in token order (stable).
    assert permuted[:3, 0].tolist() == [0.0, 2.0, 4.0]
    ones = torch.ones(5, 2)
    back = unpermute_combine(permuted, perm, ones)
    torch.testing.assert_close(back, hidden * 2)


def _naive_moe(
    x: torch.Tensor, logits: torch.Tensor, w_gu: torch.Tensor, w_down: torch.Tensor, k: int
) -> torch.Tensor:
    """Token by token, in float64: sum over its top-k experts of weight * SwiGLU_e(x)."""
    inter = w_down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        p = torch.softmax(logits[t].double(), -1)
        top = torch.topk(p, k)
        ws = top.values / top.values.sum()
        for w, e in zip(ws.tolist(), top.indices.tolist(), strict=True):
            gu = w_gu[e].double() @ x[t].double()
            out[t] += w * (w_down[e].double() @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


def test_moe_swiglu_matches_naive() -> None:
    g = torch.Generator().manual_seed(0)
    t, d, inter, e, k = 9, 16, 24, 8, 2
    x = torch.randn(t, d, generator=g)
    logits = torch.randn(t, e, generator=g)
    w_gu = torch.randn(e, 2 * inter, d, generator=g) * 0.2
    w_down = torch.randn(e, d, inter, generator=g) * 0.2
    out = moe_swiglu(x, logits, w_gu, w_down, k)
    torch.testing.assert_close(
        out.double(), _naive_moe(x, logits, w_gu, w_down, k), atol=1e-5, rtol=1e-5
    )


def test_grouped_swiglu_rows_use_their_expert() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=g)
    w_gu = torch.randn(3, 10, 8, generator=g)
    w_down = torch.randn(3, 8, 5, generator=g)
    counts = torch.tensor([2, 0, 4])
    out = grouped_swiglu(x, counts, w_gu, w_down)
    for r, e in enumerate([0, 0, 2, 2, 2, 2]):
        gu = w_gu[e] @ x[r]
        torch.testing.assert_close(
            out[r], w_down[e] @ (F.silu(gu[:5]) * gu[5:]), atol=1e-5, rtol=1e-5
        )

"""Triton RMSNorm (+ fused residual add), top-k routing and grouped SwiGLU vs the torch references."""

from __future__ import annotations

import pytest
import torch

from batonserve.kernels.moe import grouped_swiglu, moe_swiglu, permute_by_expert, topk_routing
from batonserve.kernels.norm import fused_add_rms_norm, rms_norm
from batonserve.kernels.triton.grouped_swiglu import grouped_swiglu_triton
from batonserve.kernels.triton.rms_norm import fused_add_rms_norm_triton, rms_norm_triton
from batonserve.kernels.triton.topk_routing import topk_routing_triton

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Norm: same rounding order as the reference, so half types are off by at most about one ulp.
NORM_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
# SwiGLU: the kernel keeps gate/up in fp32 where the reference rounds them to the dtype.
FFN_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 4e-2), torch.float16: (1e-2, 1e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    """Rows of width 40 (not a power of two), 3-D input, weight in the input dtype."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 5, 40, generator=gen) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(40, generator=gen)).to(dtype)
    ref = rms_norm(x, w, 1e-6)
    out = rms_norm_triton(x.to(device), w.to(device), 1e-6)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    atol, rtol = NORM_TOL[dtype]
    torch.testing.assert_close(out.cpu(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    """The residual sum is bit-identical (rounded in the dtype) and the norm matches."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 64, generator=gen).to(dtype)
    res = torch.randn(7, 64, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(64, generator=gen)).to(dtype)
    ref_norm, ref_sum = fused_add_rms_norm(x, res, w, 1e-5)
    out_norm, out_sum = fused_add_rms_norm_triton(x.to(device), res.to(device), w.to(device), 1e-5)
    torch.testing.assert_close(out_sum.cpu(), ref_sum, atol=0, rtol=0)
    atol, rtol = NORM_TOL[dtype]
    torch.testing.assert_close(out_norm.cpu(), ref_norm, atol=atol, rtol=rtol)


def test_rms_norm_half_input_fp32_weight(device: torch.device) -> None:
    """bf16 activations with an fp32 weight give fp32 output, as torch's type promotion does."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    w = 1 + 0.1 * torch.randn(32, generator=gen)
    ref = rms_norm(x, w, 1e-6)
    out = rms_norm_triton(x.to(device), w.to(device), 1e-6)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_experts", "top_k", "renorm"), [(8, 2, True), (6, 3, False), (5, 1, True)]
)
def test_topk_routing_matches_reference(
    device: torch.device, dtype: torch.dtype, num_experts: int, top_k: int, renorm: bool
) -> None:
    """Same weights in descending order; same experts (bf16 logits tie, and ties may pick either)."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, num_experts, generator=gen) * 2).to(dtype)
    ref_w, ref_ids = topk_routing(logits, top_k, renormalize=renorm)
    w, ids = topk_routing_triton(logits.to(device), top_k, renormalize=renorm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64
    torch.testing.assert_close(w.cpu(), ref_w, atol=1e-6, rtol=1e-5)
    ids = ids.cpu()
    assert all(len(set(row)) == top_k for row in ids.tolist())  # k distinct experts
    probs = torch.softmax(logits.float(), -1)
    ref_p, _ = torch.topk(probs, top_k, dim=-1)
    torch.testing.assert_close(probs.gather(1, ids), ref_p, atol=0, rtol=0)  # a true top k
    if dtype == torch.float32:  # no ties: the very same experts, in the same order
        assert ids.tolist() == ref_ids.tolist()


def test_topk_routing_rejects_bad_k(device: torch.device) -> None:
    """top_k outside 1..E is a user error naming the field."""
    with pytest.raises(ValueError, match="top_k"):
        topk_routing_triton(torch.zeros(2, 4, device=device), 5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grouped_swiglu_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    """Uneven expert groups, one expert empty, 24 rows split across tiles of 16 with partial tiles."""
    gen = torch.Generator().manual_seed(4)
    num_experts, dim, inter = 4, 32, 48
    counts = torch.tensor([9, 0, 13, 2])
    x = torch.randn(int(counts.sum()), dim, generator=gen).to(dtype)
    w_gu = (torch.randn(num_experts, 2 * inter, dim, generator=gen) / dim**0.5).to(dtype)
    w_down = (torch.randn(num_experts, dim, inter, generator=gen) / inter**0.5).to(dtype)
    ref = grouped_swiglu(x, counts, w_gu, w_down)
    out = grouped_swiglu_triton(x.to(device), counts.to(device), w_gu.to(device), w_down.to(device))
    atol, rtol = FFN_TOL[dtype]
    torch.testing.assert_close(out.cpu(), ref, atol=atol, rtol=rtol)


def test_moe_pipeline_with_triton_parts(device: torch.device) -> None:
    """Route + permute + grouped FFN + combine with the Triton parts equals the reference moe_swiglu."""
    from batonserve.kernels.moe import unpermute_combine

    gen = torch.Generator().manual_seed(5)
    tokens, num_experts, dim, inter, top_k = 11, 6, 16, 32, 2
    hidden = torch.randn(tokens, dim, generator=gen)
    logits = torch.randn(tokens, num_experts, generator=gen)
    w_gu = torch.randn(num_experts, 2 * inter, dim, generator=gen) / dim**0.5
    w_down = torch.randn(num_experts, dim, inter, generator=gen) / inter**0.5
    ref = moe_swiglu(hidden, logits, w_gu, w_down, top_k)
    weights, ids = topk_routing_triton(logits.to(device), top_k)
    permuted, perm = permute_by_expert(hidden.to(device), ids, num_experts)
    expert_out = grouped_swiglu_triton(permuted, perm.counts, w_gu.to(device), w_down.to(device))
    out = unpermute_combine(expert_out, perm, weights)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)

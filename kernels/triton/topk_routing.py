"""Triton MoE router: softmax over experts in fp32, top-k, renormalize; one program per token."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batonserve.kernels.triton._common import pow2


@triton.jit
def _topk_kernel(
    logits_ptr,  # [T, E]
    w_ptr,  # [T, K] float32
    ids_ptr,  # [T, K] int64
    E,
    stride_t,
    TOP_K: tl.constexpr,
    RENORM: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + t * stride_t + offs, mask=offs < E, other=-float("inf"))
    x = x.to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    p = e / tl.sum(e, axis=0)  # [BLOCK_E], 0 past E
    p = tl.where(offs < E, p, -1.0)  # padding never wins a slot
    offs_k = tl.arange(0, BLOCK_K)
    w_vec = tl.zeros([BLOCK_K], tl.float32)
    id_vec = tl.zeros([BLOCK_K], tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        # Lowest index among the maxima (torch.topk's order for ties is unspecified).
        idx = tl.min(tl.where(p == best, offs, BLOCK_E), axis=0)
        w_vec = tl.where(offs_k == j, best, w_vec)
        id_vec = tl.where(offs_k == j, idx.to(tl.int64), id_vec)
        p = tl.where(offs == idx, -1.0, p)
    if RENORM:
        w_vec = w_vec / tl.sum(tl.where(offs_k < TOP_K, w_vec, 0.0), axis=0)
    tl.store(w_ptr + t * TOP_K + offs_k, w_vec, mask=offs_k < TOP_K)
    tl.store(ids_ptr + t * TOP_K + offs_k, id_vec, mask=offs_k < TOP_K)


def topk_routing_triton(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `topk_routing`: logits [T, E] -> (weights [T, k] fp32, expert_ids [T, k] int64)."""
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k: must be in 1..{num_experts} (num_experts), got {top_k}")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens > 0:
        _topk_kernel[(num_tokens,)](
            logits,
            weights,
            ids,
            num_experts,
            logits.stride(0),
            TOP_K=top_k,
            RENORM=renormalize,
            BLOCK_E=pow2(num_experts, lo=2),
            BLOCK_K=pow2(top_k, lo=2),
        )
    return weights, ids

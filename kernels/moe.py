"""Mixture-of-Experts kernels (torch reference): top-k routing, permute, grouped SwiGLU, combine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batonserve.kernels.dispatch import use_triton


def topk_routing(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts in float32, keep the top k, renormalize them to sum 1 (Mixtral).

    router_logits [T, E] -> (weights [T, k] float32, expert_ids [T, k] int64).
    """
    if use_triton(router_logits):
        from batonserve.kernels.triton.topk_routing import topk_routing_triton

        return topk_routing_triton(router_logits, top_k, renormalize=renormalize)
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@dataclass(frozen=True)
class Permutation:
    """Token copies sorted by expert: row r of the permuted batch is token order[r] // k's copy."""

    order: torch.Tensor  # [T * k] int64, flat (token, slot) index of each permuted row
    counts: torch.Tensor  # [E] int64, rows per expert (experts' rows are contiguous, in order)
    top_k: int


def permute_by_expert(
    hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, Permutation]:
    """Group token copies by expert: hidden [T, D], ids [T, k] -> (permuted [T*k, D], Permutation)."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    top_k = int(expert_ids.shape[1])
    return hidden[order // top_k], Permutation(order, counts, top_k)


def grouped_swiglu(
    x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Expert FFN on contiguous per-expert row groups: x [N, D] -> [N, D].

    w_gate_up [E, 2I, D] (gate rows first, then up), w_down [E, D, I]; expert e runs
    down(silu(gate x) * up x) on its counts[e] rows.
    """
    if use_triton(x) and w_gate_up.dtype == x.dtype and w_down.dtype == x.dtype:
        from batonserve.kernels.triton.grouped_swiglu import grouped_swiglu_triton

        return grouped_swiglu_triton(x, counts, w_gate_up, w_down)
    out = torch.empty_like(x)
    inter = w_down.shape[-1]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        rows = x[start : start + n]
        gu = F.linear(rows, w_gate_up[e])  # [n, 2I]
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        out[start : start + n] = F.linear(act, w_down[e])
        start += n
    return out


def unpermute_combine(
    expert_out: torch.Tensor, perm: Permutation, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs: [T*k, D] permuted rows -> [T, D]."""
    num_tokens = weights.shape[0]
    w = weights.reshape(-1)[perm.order].to(expert_out.dtype)  # [T*k]
    out = torch.zeros(
        num_tokens, expert_out.shape[1], dtype=expert_out.dtype, device=expert_out.device
    )
    out.index_add_(0, perm.order // perm.top_k, expert_out * w[:, None])
    return out


def moe_swiglu(
    hidden: torch.Tensor,
    router_logits: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Route, permute, run the experts, combine: hidden [T, D] -> [T, D]."""
    weights, ids = topk_routing(router_logits, top_k)
    permuted, perm = permute_by_expert(hidden, ids, w_gate_up.shape[0])
    return unpermute_combine(
        grouped_swiglu(permuted, perm.counts, w_gate_up, w_down), perm, weights
    )

"""MoE expert FFN over experts given one by one (a store's resident tensors, or a rank's shard).

Same math, op for op, as `kernels.moe.grouped_swiglu`, so outputs are bitwise identical when the
rows of each expert are the same; only where the weights come from differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def swiglu_experts(
    x: torch.Tensor, counts: Sequence[int], experts: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """x [N, D] rows grouped by expert (counts[i] rows for experts[i]) -> [N, D].

    experts[i] = (w_gate_up [2I, D] gate rows first, w_down [D, I]).
    """
    assert len(counts) == len(experts), "one row count per expert"
    out = torch.empty_like(x)
    start = 0
    for n, (w_gate_up, w_down) in zip(counts, experts, strict=True):
        if n == 0:
            continue
        inter = w_down.shape[-1]
        rows = x[start : start + n]
        gu = F.linear(rows, w_gate_up)  # [n, 2I]
        act = F.silu(gu[:, :inter]) * gu[:, inter:]
        out[start : start + n] = F.linear(act, w_down)
        start += n
    return out

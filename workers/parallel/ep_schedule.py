"""Deterministic dispatch schedule of expert-parallel MoE (Tutel-style), computed alike on every rank.

Every rank knows the whole routing count matrix C[src, expert] (one all-gather per forward), so every
rank derives the same rounds without further agreement. Overlap degree d splits each (src, expert)
row run into d chunks, so the all-to-all of chunk i+1 can run while chunk i computes. Capacity factor
cf caps the rows one source sends one expert per round at ceil(cf * k*T_src / E); rows beyond it are
not dropped but go in extra rounds of the same chunk (the "second pass"), so in inference every token
copy is computed whatever cf is. Changing d or cf changes only this schedule, never the weight layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EPShape:
    """Who owns what: E experts in contiguous blocks of E / W per rank."""

    world_size: int
    rank: int
    num_experts: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank: {self.rank} is not in a group of {self.world_size}")
        if self.num_experts % self.world_size:
            raise ValueError(
                f"expert_parallel_size: {self.world_size} must divide num_experts {self.num_experts}"
            )

    @property
    def per_rank(self) -> int:
        """Experts per rank."""
        return self.num_experts // self.world_size

    def experts_of(self, rank: int) -> range:
        """The experts rank `rank` owns."""
        return range(rank * self.per_rank, (rank + 1) * self.per_rank)


@dataclass(frozen=True)
class RoundPlan:
    """One all-to-all round as seen by one rank."""

    send_index: torch.Tensor  # [n_send] int64 rows of my permuted batch, dest-major then expert
    send_counts: list[int]  # rows to each dest rank
    recv_counts: list[int]  # rows from each src rank
    recv_to_expert: torch.Tensor  # [n_recv] int64: received row order -> expert-major order
    expert_counts: list[int]  # rows per local expert (expert-major order)


def _ranges(starts: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Concatenated aranges [starts[i], starts[i] + sizes[i]) (1-D int64 inputs)."""
    total = int(sizes.sum())
    if total == 0:
        return torch.empty(0, dtype=torch.int64)
    excl = torch.cumsum(sizes, 0) - sizes  # where each range begins in the output
    return torch.repeat_interleave(starts - excl, sizes) + torch.arange(total)


def plan_rounds(
    shape: EPShape, counts: torch.Tensor, overlap: int, capacity_factor: float
) -> list[RoundPlan]:
    """All rounds of one forward for `shape.rank`; counts [W, E] int64 rows per (src, expert)."""
    if overlap < 1:
        raise ValueError(f"overlap: must be >= 1, got {overlap}")
    if capacity_factor < 0 or not math.isfinite(capacity_factor):
        raise ValueError(f"capacity_factor: must be >= 0 (0 = no cap), got {capacity_factor}")
    w, e_total = shape.world_size, shape.num_experts
    c = counts.to(torch.int64).cpu()
    assert tuple(c.shape) == (w, e_total), "counts must be [W, E]"
    me, mine = shape.rank, shape.experts_of(shape.rank)
    lo_e, hi_e = mine.start, mine.stop
    expert_start = torch.cumsum(c[me], 0) - c[me]  # [E] first permuted row of each expert (mine)
    # per-source cap on rows per (expert, round); 0 = uncapped
    caps = torch.zeros(w, 1, dtype=torch.int64)
    if capacity_factor > 0:
        caps[:, 0] = torch.clamp(torch.ceil(capacity_factor * c.sum(1) / e_total).long(), min=1)
    base, rem = c // overlap, c % overlap  # [W, E]
    rounds: list[RoundPlan] = []
    for chunk in range(overlap):
        size_c = base + (rem > chunk).long()  # [W, E] rows of this chunk
        off_c = base * chunk + torch.clamp(rem, max=chunk)  # [W, E] its first row within expert
        capped = caps.expand(w, e_total)
        subrounds = 1
        if capacity_factor > 0:
            subrounds = max(1, int(((size_c + capped - 1) // capped).max()))
        for j in range(subrounds):
            if capacity_factor > 0:
                lo = torch.minimum(j * capped, size_c)
                size = torch.minimum(capped, size_c - lo)  # [W, E]
            else:
                lo, size = torch.zeros_like(size_c), size_c
            off = off_c + lo
            send_index = _ranges(expert_start + off[me], size[me])
            per_dest = size[me].view(w, shape.per_rank).sum(1)  # dest blocks are contiguous
            recv_blocks = size[:, lo_e:hi_e]  # [W, E/W] received src-major, expert ascending
            flat = recv_blocks.reshape(-1)
            starts = (torch.cumsum(flat, 0) - flat).view(w, shape.per_rank)
            order = _ranges(starts.T.reshape(-1), recv_blocks.T.reshape(-1))  # expert-major
            rounds.append(
                RoundPlan(
                    send_index=send_index,
                    send_counts=per_dest.tolist(),
                    recv_counts=recv_blocks.sum(1).tolist(),
                    recv_to_expert=order,
                    expert_counts=recv_blocks.sum(0).tolist(),
                )
            )
    return rounds

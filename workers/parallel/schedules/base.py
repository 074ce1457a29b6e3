"""The interface every sequence-parallel attention schedule implements, and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from batonserve.kernels.ring import BlockPlan, plan_block
from batonserve.workers.parallel.comm import SPGroup
from batonserve.workers.parallel.layout import ShardSpec
from batonserve.workers.parallel.metrics import StepMetrics, StepRecorder


@dataclass(frozen=True)
class AttentionDims:
    """Head geometry and element size of one attention layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    elem_bytes: int  # bytes per q/k/v element on the wire (2 for bf16, 4 for float32)

    def __post_init__(self) -> None:
        if min(self.num_heads, self.num_kv_heads, self.head_dim, self.elem_bytes) < 1:
            raise ValueError(f"AttentionDims fields must be >= 1, got {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def kv_row_bytes(self) -> int:
        """Bytes of one KV row on the wire: its K and its V (all KV heads)."""
        return 2 * self.num_kv_heads * self.head_dim * self.elem_bytes


@dataclass(frozen=True)
class LinkBytes:
    """Bytes one rank sends in one step: `fwd` to its ring successor, `back` on the result group."""

    fwd: int
    back: int

    @property
    def total(self) -> int:
        """Bytes on both links."""
        return self.fwd + self.back

    @property
    def busiest(self) -> int:
        """Bytes on the busier link direction (links are full duplex)."""
        return max(self.fwd, self.back)


@dataclass(frozen=True)
class GroupMeta:
    """Every rank's ShardSpec (exchanged once per forward, shared by all layers)."""

    shards: tuple[ShardSpec, ...]

    @property
    def n_q(self) -> list[int]:
        """Query rows per rank."""
        return [s.num_q for s in self.shards]

    @property
    def n_kv(self) -> list[int]:
        """KV rows per rank."""
        return [s.num_kv for s in self.shards]


@dataclass(frozen=True)
class ScheduleResult:
    """This rank's merged attention output and its per-step metrics."""

    out: torch.Tensor  # [n_q, H, d] in q's dtype
    lse: torch.Tensor  # [n_q, H] float32; -inf for a row that saw no key
    steps: tuple[StepMetrics, ...]


def plan_pair(q: ShardSpec, kv: ShardSpec, tile: int) -> BlockPlan:
    """The block plan of q's queries over kv's keys."""
    return plan_block(q.q_pos, q.q_seq, kv.kv_pos, kv.kv_seq, tile=tile)


def merged_result(
    q: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    recs: list[StepRecorder],
) -> ScheduleResult:
    """The merged result (out cast to q's dtype) and the frozen metrics of every step."""
    assert out is not None and lse is not None
    return ScheduleResult(out.to(q.dtype), lse, tuple(r.freeze() for r in recs))


class Schedule(ABC):
    """A way to compute causal attention of every rank's queries over every rank's keys."""

    @abstractmethod
    def plan_blocks(self, meta: GroupMeta, rank: int, tile: int) -> tuple[BlockPlan, ...]:
        """The local block plan of each step on `rank` (depends on positions only)."""

    @abstractmethod
    def bytes_per_step(
        self, n_q: list[int], n_kv: list[int], rank: int, dims: AttentionDims
    ) -> list[LinkBytes]:
        """Bytes `rank` sends in each step, from the per-rank row counts (the formula)."""

    @abstractmethod
    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocks: tuple[BlockPlan, ...],
        meta: GroupMeta,
        g: SPGroup,
        scale: float,
    ) -> ScheduleResult:
        """Run on this rank: q [n_q, H, d], k/v [n_kv, Hkv, d] (its own rows)."""

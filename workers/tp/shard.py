"""TPShard: which slice of every sharded dimension this rank owns, and the group's collectives.

Megatron layout: q/k/v and gate/up are column-parallel (each rank owns whole heads / a slice of
the intermediate width), o and down are row-parallel (each rank's partial sum, one all-reduce per
block), embedding and LM head are vocab-parallel (rows split, padded to equal size). When there
are fewer KV heads than ranks, each KV head is replicated on N // num_kv_heads consecutive ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from batonserve.workers.models.config import ModelConfig

Region = tuple[int, int, int]  # (dim, start, stop) of a checkpoint tensor


@dataclass(frozen=True)
class TPShard:
    """This rank's place in a tensor-parallel group of `size` ranks (group None: the default)."""

    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; Any keeps the dataclass picklable-free

    def split(self, total: int, what: str) -> tuple[int, int]:
        """[start, stop) of an evenly split dimension; ValueError naming `what` when uneven."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size: {self.size} does not divide {what} ({total})")
        n = total // self.size
        return self.rank * n, (self.rank + 1) * n

    def kv_heads(self, num_kv: int) -> tuple[int, int]:
        """[start, stop) of the KV heads this rank owns: split, or one replicated head."""
        if num_kv % self.size == 0:
            return self.split(num_kv, "num_key_value_heads")
        if self.size % num_kv:
            raise ValueError(
                f"tensor_parallel_size: {self.size} and num_key_value_heads ({num_kv}) must "
                "divide one another (KV heads are split, or replicated when fewer than ranks)"
            )
        head = self.rank // (self.size // num_kv)
        return head, head + 1

    def vocab(self, vocab_size: int) -> tuple[int, int, int]:
        """(start, stop, rows): rows = ceil(vocab / size), the padded per-rank table height."""
        rows = -(-vocab_size // self.size)
        start = min(self.rank * rows, vocab_size)
        return start, min(start + rows, vocab_size), rows

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the group (in place), the row-parallel blocks' one collective."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., size * n], rank order (vocab-parallel logits)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def check_tp(cfg: ModelConfig, size: int) -> None:
    """ValueError naming the first dimension `size` ranks cannot split for this model."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size: must be >= 1, got {size}")
    for rank in (0, size - 1):
        tp = TPShard(rank, size)
        tp.split(cfg.num_heads, "num_attention_heads")
        tp.kv_heads(cfg.num_kv_heads)
        if not cfg.is_moe or cfg.dense_mlp_layers:
            tp.split(cfg.intermediate_size, "intermediate_size")
        if cfg.is_moe:
            inter = cfg.moe_intermediate_size or cfg.intermediate_size
            tp.split(inter, "the experts' intermediate size")
        if cfg.shared_expert_intermediate_size:
            tp.split(cfg.shared_expert_intermediate_size, "shared_expert_intermediate_size")

"""Tensor parallelism: one model split over the ranks of a torch.distributed group (Megatron)."""

from batonserve.workers.tp.shard import TPShard, check_tp

__all__ = ["TPShard", "check_tp"]

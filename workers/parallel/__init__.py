"""Sequence-parallel prefill: layouts, ring / TokenRing / all-gather schedules, cost model."""

from batonserve.workers.parallel.attention import (
    SPAttentionOutput,
    SPAttentionPlan,
    exchange_meta,
    plan_sp_attention,
    sp_attention,
)
from batonserve.workers.parallel.comm import SPCommError, SPGroup
from batonserve.workers.parallel.cost_model import (
    HardwareModel,
    SPShape,
    bytes_sent_per_step,
    choose_schedule,
    estimate,
)
from batonserve.workers.parallel.layout import RankShard, ShardSpec, shard_batch
from batonserve.workers.parallel.metrics import SPMetrics, StepMetrics
from batonserve.workers.parallel.schedules import SCHEDULES, AttentionDims, LinkBytes

__all__ = [
    "SCHEDULES",
    "AttentionDims",
    "HardwareModel",
    "LinkBytes",
    "RankShard",
    "SPAttentionOutput",
    "SPAttentionPlan",
    "SPCommError",
    "SPGroup",
    "SPMetrics",
    "SPShape",
    "ShardSpec",
    "StepMetrics",
    "bytes_sent_per_step",
    "choose_schedule",
    "estimate",
    "exchange_meta",
    "plan_sp_attention",
    "shard_batch",
    "sp_attention",
]

"""Sequence-parallel prefill: layouts, ring / TokenRing / all-gather schedules, cost model.

Names resolve on first use, so light parts (the EP tuner's stats) import without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batonserve.workers.lazy_exports import lazy_exports

if TYPE_CHECKING:
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

_HOMES = {
    "SPAttentionOutput": "attention",
    "SPAttentionPlan": "attention",
    "exchange_meta": "attention",
    "plan_sp_attention": "attention",
    "sp_attention": "attention",
    "SPCommError": "comm",
    "SPGroup": "comm",
    "HardwareModel": "cost_model",
    "SPShape": "cost_model",
    "bytes_sent_per_step": "cost_model",
    "choose_schedule": "cost_model",
    "estimate": "cost_model",
    "RankShard": "layout",
    "ShardSpec": "layout",
    "shard_batch": "layout",
    "SPMetrics": "metrics",
    "StepMetrics": "metrics",
    "SCHEDULES": "schedules",
    "AttentionDims": "schedules",
    "LinkBytes": "schedules",
}
__getattr__ = lazy_exports(__name__, _HOMES)

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

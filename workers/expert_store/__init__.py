"""Tiered expert store (ExpertFlow-style): disk -> RAM -> GPU tiers, cache policies, prediction.

Names resolve on first use, so the metrics' stats types import without torch (router)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from batonserve.workers.lazy_exports import lazy_exports

if TYPE_CHECKING:
    from batonserve.workers.expert_store.moe_block import (
        MoEController,
        ResidentExperts,
        RoutedMoE,
        attach_resident,
        attach_store,
    )
    from batonserve.workers.expert_store.policies import POLICIES, PolicyContext, make_policy
    from batonserve.workers.expert_store.predictor import RoutingPredictor, default_predictor_path
    from batonserve.workers.expert_store.store import ExpertStore
    from batonserve.workers.expert_store.types import (
        ExpertKey,
        ExpertStoreStats,
        ExpertWeights,
        StoreConfig,
        TierStats,
    )

_HOMES = {
    "MoEController": "moe_block",
    "ResidentExperts": "moe_block",
    "RoutedMoE": "moe_block",
    "attach_resident": "moe_block",
    "attach_store": "moe_block",
    "POLICIES": "policies",
    "PolicyContext": "policies",
    "make_policy": "policies",
    "RoutingPredictor": "predictor",
    "default_predictor_path": "predictor",
    "ExpertStore": "store",
    "ExpertKey": "types",
    "ExpertStoreStats": "types",
    "ExpertWeights": "types",
    "StoreConfig": "types",
    "TierStats": "types",
}
__getattr__ = lazy_exports(__name__, _HOMES)

__all__ = [
    "POLICIES",
    "ExpertKey",
    "ExpertStore",
    "ExpertStoreStats",
    "ExpertWeights",
    "MoEController",
    "PolicyContext",
    "ResidentExperts",
    "RoutedMoE",
    "RoutingPredictor",
    "StoreConfig",
    "TierStats",
    "attach_resident",
    "attach_store",
    "default_predictor_path",
    "make_policy",
]

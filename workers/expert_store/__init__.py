"""Tiered expert store (ExpertFlow-style): disk -> RAM -> GPU tiers, cache policies, prediction."""

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

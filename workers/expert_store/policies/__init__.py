"""Cache policies of the expert store, one file each; importing this fills the registry."""

from batonserve.workers.expert_store.policies import belady, lru, popularity, predictive
from batonserve.workers.expert_store.policies.base import (
    POLICIES,
    CachePolicy,
    PolicyContext,
    make_policy,
    register_policy,
)

__all__ = [
    "POLICIES",
    "CachePolicy",
    "PolicyContext",
    "belady",
    "lru",
    "make_policy",
    "popularity",
    "predictive",
    "register_policy",
]

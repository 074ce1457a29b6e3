"""Cache policies of the expert store, one file each, and their registry."""

from batonserve.workers.expert_store.policies.base import CachePolicy, PolicyContext
from batonserve.workers.plugins import Registry

# The one list of cache policies: name -> "module:class", imported when a store builds one.
POLICIES: Registry[type[CachePolicy]] = Registry(
    "cache policy",
    "policy",
    __name__,
    {
        "lru": "lru:LRUPolicy",
        "popularity": "popularity:PopularityPolicy",
        "predictive": "predictive:PredictivePolicy",
        "belady": "belady:BeladyPolicy",
    },
)
# Belady needs the future demand trace: it measures the others offline and cannot serve.
SERVING_POLICIES = tuple(name for name in POLICIES if name != "belady")


def make_policy(name: str, ctx: PolicyContext) -> CachePolicy:
    """Build the policy registered as `name`, or raise ValueError naming the field."""
    return POLICIES.get(name)(ctx)


__all__ = ["POLICIES", "SERVING_POLICIES", "CachePolicy", "PolicyContext", "make_policy"]

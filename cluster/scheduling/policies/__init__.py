"""Pairing policies (plug-ins, one per file) and their registry."""

from batonserve.cluster.scheduling.policies.base import PairingPolicy
from batonserve.cluster.schema import ConfigError
from batonserve.workers.plugins import Registry

POLICIES: Registry[type[PairingPolicy]] = Registry(
    "pairing policy",
    "scheduler.policy",
    __name__,
    {
        "round_robin": "round_robin:RoundRobinPolicy",
        "jsq": "jsq:JSQPolicy",
        "splitwise": "splitwise:SplitwisePolicy",
    },
    error=ConfigError,
)


def make_policy(name: str) -> PairingPolicy:
    """A fresh policy instance (policies may keep state, e.g. a round-robin cursor)."""
    return POLICIES.get(name)()


__all__ = ["POLICIES", "PairingPolicy", "make_policy"]

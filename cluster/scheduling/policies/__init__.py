"""Pairing policies (plug-ins, one per file) and their registry."""

from batonserve.cluster.scheduling.policies import jsq, round_robin, splitwise
from batonserve.cluster.scheduling.policies.base import (
    PairingPolicy,
    available_policies,
    make_policy,
    register_policy,
)

__all__ = [
    "PairingPolicy",
    "available_policies",
    "jsq",
    "make_policy",
    "register_policy",
    "round_robin",
    "splitwise",
]

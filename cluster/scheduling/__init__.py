"""Cluster-level scheduler: pairing policies, conditional disaggregation, mixed pool, admission.

Plain Python (no Ray, torch or gRPC): the live cluster and the simulator run this same code.
"""

from batonserve.cluster.scheduling.config import (
    AdmissionConfig,
    MixedPoolConfig,
    SchedulerConfig,
)
from batonserve.cluster.scheduling.decision_log import (
    DecisionLog,
    DecisionRecord,
    DecisionRecorder,
    replay,
)
from batonserve.cluster.scheduling.policies import POLICIES, PairingPolicy, make_policy
from batonserve.cluster.scheduling.prefix import NoPrefixCache, PrefixIndex, PrefixLookup
from batonserve.cluster.scheduling.scheduler import ClusterScheduler, assume_assigned
from batonserve.cluster.scheduling.types import (
    Decision,
    Pairing,
    PairingMode,
    Rejection,
    RejectReason,
    RequestView,
    Role,
    RoleChange,
    WorkerView,
)

__all__ = [
    "POLICIES",
    "AdmissionConfig",
    "ClusterScheduler",
    "Decision",
    "DecisionLog",
    "DecisionRecord",
    "DecisionRecorder",
    "MixedPoolConfig",
    "NoPrefixCache",
    "Pairing",
    "PairingMode",
    "PairingPolicy",
    "PrefixIndex",
    "PrefixLookup",
    "RejectReason",
    "Rejection",
    "RequestView",
    "Role",
    "RoleChange",
    "SchedulerConfig",
    "WorkerView",
    "assume_assigned",
    "make_policy",
    "replay",
]

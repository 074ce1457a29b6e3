"""The `kv_transfer` config section: which transport moves KV between phases, and its clocks."""

from __future__ import annotations

from dataclasses import dataclass, field

from batonserve.workers.kv_transfer import TRANSPORTS
from batonserve.workers.plugins import choices

TransportName = str  # a name in TRANSPORTS


@dataclass(frozen=True)
class KVTransferConfig:
    """How a prefill worker hands a request's KV cache to its decode worker."""

    transport: TransportName = field(default="torch_dist", metadata=choices(TRANSPORTS.names()))
    lease_s: float = 30.0  # an unacknowledged handoff is aborted and freed after this
    send_timeout_s: float = 20.0  # one layer's send/recv; a dead peer fails well before
    connect_timeout_s: float = 30.0  # rendezvous of a new per-pair channel

    def __post_init__(self) -> None:
        TRANSPORTS.check(self.transport)
        for name in ("lease_s", "send_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"kv_transfer.{name}: must be > 0 seconds, got {value!r}")

"""KV handoff transports behind one small interface, chosen by name from a registry."""

from __future__ import annotations

from typing import Any

from batonserve.workers.kv_transfer.base import (
    FINAL_LAYER,
    ChannelAddress,
    KVChunk,
    KVSpec,
    KVTransferError,
    KVTransport,
)
from batonserve.workers.kv_transfer.config import KVTransferConfig
from batonserve.workers.kv_transfer.object_store import ObjectStoreTransport
from batonserve.workers.kv_transfer.torch_dist import TorchDistTransport

TRANSPORTS: dict[str, type[KVTransport]] = {
    TorchDistTransport.name: TorchDistTransport,
    ObjectStoreTransport.name: ObjectStoreTransport,
}


def make_transport(name: str, *args: Any, **kwargs: Any) -> KVTransport:
    """Build the transport registered as `name` (ValueError naming kv_transfer.transport)."""
    cls = TRANSPORTS.get(name)
    if cls is None:
        raise ValueError(
            f"kv_transfer.transport: unknown {name!r}; choose one of {sorted(TRANSPORTS)}"
        )
    if cls is not TorchDistTransport:
        kwargs.pop("device", None)
    return cls(*args, **kwargs)


__all__ = [
    "FINAL_LAYER",
    "TRANSPORTS",
    "ChannelAddress",
    "KVChunk",
    "KVSpec",
    "KVTransferConfig",
    "KVTransferError",
    "KVTransport",
    "make_transport",
]

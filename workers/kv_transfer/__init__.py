"""KV handoff transports behind one small interface, chosen by name from a registry.

The names are resolved on first use (PEP 562) so that `kv_transfer.config`, which the router's
config needs, can be imported without torch: a router is a light front end."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batonserve.workers.lazy_exports import lazy_exports
from batonserve.workers.plugins import Registry

if TYPE_CHECKING:
    from batonserve.workers.kv_transfer.base import (
        FINAL_LAYER,
        ChannelAddress,
        KVChunk,
        KVSpec,
        KVTransferError,
        KVTransport,
    )
    from batonserve.workers.kv_transfer.config import KVTransferConfig

# Exported name -> the module of this package that defines it.
_HOMES = {
    "FINAL_LAYER": "base",
    "ChannelAddress": "base",
    "KVChunk": "base",
    "KVSpec": "base",
    "KVTransferError": "base",
    "KVTransport": "base",
    "KVTransferConfig": "config",
}

# The one list of transports: name -> "module:class", imported when a transport is built.
TRANSPORTS: Registry[type[KVTransport]] = Registry(
    "KV transport",
    "kv_transfer.transport",
    __name__,
    {
        "torch_dist": "torch_dist:TorchDistTransport",
        "object_store": "object_store:ObjectStoreTransport",
    },
)


def make_transport(name: str, *args: Any, **kwargs: Any) -> KVTransport:
    """Build the transport registered as `name` (ValueError naming kv_transfer.transport)."""
    cls = TRANSPORTS.get(name)
    if name != "torch_dist":
        kwargs.pop("device", None)
    return cls(*args, **kwargs)


_exports = lazy_exports(__name__, _HOMES)


def __getattr__(name: str) -> Any:
    return _exports(name)


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

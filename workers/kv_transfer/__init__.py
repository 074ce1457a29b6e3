"""KV handoff transports behind one small interface, chosen by name from a registry.

The names are resolved on first use (PEP 562) so that `kv_transfer.config`, which the router's
config needs, can be imported without torch: a router is a light front end."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batonserve.workers.lazy_exports import lazy_exports

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

# Transport name -> "module:class"; imported when a transport is built.
_TRANSPORTS = {
    "torch_dist": "torch_dist:TorchDistTransport",
    "object_store": "object_store:ObjectStoreTransport",
}


def _load(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)


def transports() -> dict[str, type[KVTransport]]:
    """Every registered transport class by its name."""
    return {name: _load(ref) for name, ref in _TRANSPORTS.items()}


def make_transport(name: str, *args: Any, **kwargs: Any) -> KVTransport:
    """Build the transport registered as `name` (ValueError naming kv_transfer.transport)."""
    ref = _TRANSPORTS.get(name)
    if ref is None:
        raise ValueError(
            f"kv_transfer.transport: unknown {name!r}; choose one of {sorted(_TRANSPORTS)}"
        )
    cls = _load(ref)
    if name != "torch_dist":
        kwargs.pop("device", None)
    return cls(*args, **kwargs)


_exports = lazy_exports(__name__, _HOMES)


def __getattr__(name: str) -> Any:
    return transports() if name == "TRANSPORTS" else _exports(name)


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
    "transports",
]

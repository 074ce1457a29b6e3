"""The pairing-policy interface and its registry (one policy per file)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

from batonserve.cluster.scheduling.types import RequestView, WorkerView
from batonserve.cluster.schema import ConfigError


class PairingPolicy(ABC):
    """Picks a prefill worker and a decode worker among candidates that already pass admission.

    Candidate lists are never empty and come sorted by worker id; ties must break on that order
    so the live cluster and the simulator make the same choice on the same snapshot.
    """

    name: ClassVar[str]

    @abstractmethod
    def pick_prefill(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """The worker that computes the prompt."""

    @abstractmethod
    def pick_decode(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """The worker that generates the tokens (and holds the KV)."""


P = TypeVar("P", bound=type[PairingPolicy])

_REGISTRY: dict[str, type[PairingPolicy]] = {}


def register_policy(cls: P) -> P:
    """Class decorator: make a policy available under its `name`."""
    assert cls.name not in _REGISTRY, f"policy {cls.name!r} registered twice"
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> tuple[str, ...]:
    """Names of the registered policies."""
    return tuple(sorted(_REGISTRY))


def make_policy(name: str) -> PairingPolicy:
    """A fresh policy instance (policies may keep state, e.g. a round-robin cursor)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(
            f"scheduler.policy: unknown policy {name!r}; choose one of {available_policies()}"
        )
    return cls()


def argmin(
    candidates: Sequence[WorkerView], key: Callable[[WorkerView], tuple[float, ...]]
) -> WorkerView:
    """First candidate with the smallest key (stable: ties keep candidate order)."""
    best = candidates[0]
    best_key = key(best)
    for w in candidates[1:]:
        k = key(w)
        if k < best_key:
            best, best_key = w, k
    return best

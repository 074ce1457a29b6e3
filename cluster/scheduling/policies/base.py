"""The pairing-policy interface (one policy per file; the registry is the package's `POLICIES`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from batonserve.cluster.scheduling.types import RequestView, WorkerView


class PairingPolicy(ABC):
    """Picks a prefill worker and a decode worker among candidates that already pass admission.

    Candidate lists are never empty and come sorted by worker id; ties must break on that order
    so the live cluster and the simulator make the same choice on the same snapshot.
    """

    @abstractmethod
    def pick_prefill(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """The worker that computes the prompt."""

    @abstractmethod
    def pick_decode(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """The worker that generates the tokens (and holds the KV)."""


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

"""Join the shortest queue, counted in requests (the classic load balancer)."""

from __future__ import annotations

from collections.abc import Sequence

from batonserve.cluster.scheduling.policies.base import PairingPolicy, argmin
from batonserve.cluster.scheduling.types import RequestView, WorkerView


class JSQPolicy(PairingPolicy):
    """Both phases go to the worker with the fewest requests (waiting + running)."""

    def pick_prefill(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """Fewest queued-or-running requests."""
        return argmin(candidates, lambda w: (w.waiting + w.running,))

    def pick_decode(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """Fewest queued-or-running requests."""
        return argmin(candidates, lambda w: (w.waiting + w.running,))

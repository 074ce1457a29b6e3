"""Round robin: each phase cycles through its candidates, ignoring load."""

from __future__ import annotations

from collections.abc import Sequence

from batonserve.cluster.scheduling.policies.base import PairingPolicy
from batonserve.cluster.scheduling.types import RequestView, WorkerView


class RoundRobinPolicy(PairingPolicy):
    """Cycles by worker id, so a worker that drops out or joins does not reset the cycle."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}  # phase -> id of the worker picked last

    def _next(self, phase: str, candidates: Sequence[WorkerView]) -> WorkerView:
        last = self._last.get(phase)
        # Candidates are sorted by id: the next one after the last pick, wrapping around.
        pick = next((w for w in candidates if last is None or w.worker_id > last), candidates[0])
        self._last[phase] = pick.worker_id
        return pick

    def pick_prefill(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """Next prefill-capable worker in the cycle."""
        return self._next("prefill", candidates)

    def pick_decode(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """Next decode-capable worker in the cycle."""
        return self._next("decode", candidates)

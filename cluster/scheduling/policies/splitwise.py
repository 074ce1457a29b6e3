"""Splitwise's cluster-level scheduler: JSQ on pending prefill tokens, decode by free KV."""

from __future__ import annotations

from collections.abc import Sequence

from batonserve.cluster.scheduling.policies.base import PairingPolicy, argmin
from batonserve.cluster.scheduling.types import RequestView, WorkerView


class SplitwisePolicy(PairingPolicy):
    """Both workers are chosen at arrival, so the KV transfer can overlap the prefill.

    Prefill: join the shortest queue measured in *pending prompt tokens* (a request count hides
    that one 8k-token prompt costs as much as sixteen 512-token ones). Decode: the worker with the
    most free KV memory, breaking ties on fewer running requests.
    """

    def pick_prefill(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """Fewest pending prefill tokens, then fewest requests (idle ties go to a worker not decoding)."""
        return argmin(candidates, lambda w: (w.pending_prefill_tokens, w.waiting + w.running))

    def pick_decode(self, request: RequestView, candidates: Sequence[WorkerView]) -> WorkerView:
        """Most free KV tokens, then fewest running requests."""
        return argmin(candidates, lambda w: (-w.free_kv_tokens, w.running))

"""The cluster-level scheduler (Splitwise CLS): pair each arriving request, or reject it at once.

Plain Python over snapshots: the Ray controller and the simulator call the very same object.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from batonserve.cluster.scheduling.admission import (
    decode_fits,
    kv_capacity_tokens,
    kv_need_tokens,
    prefill_fits,
)
from batonserve.cluster.scheduling.config import SchedulerConfig
from batonserve.cluster.scheduling.decision_log import DecisionRecord, DecisionRecorder
from batonserve.cluster.scheduling.mixed_pool import MixedPool
from batonserve.cluster.scheduling.policies import make_policy
from batonserve.cluster.scheduling.prefix import NoPrefixCache, PrefixLookup
from batonserve.cluster.scheduling.types import (
    DECODE_CAPABLE,
    PREFILL_CAPABLE,
    Decision,
    Pairing,
    Rejection,
    RejectReason,
    RequestView,
    RoleChange,
    WorkerView,
)


class ClusterScheduler:
    """Pairs requests with a prefill and a decode worker and runs the mixed pool.

    `schedule` decides one request against a snapshot of every worker; `rebalance` returns the
    mixed pool's role changes for the caller to apply. Neither call blocks or does I/O.
    """

    def __init__(self, config: SchedulerConfig, prefix_lookup: PrefixLookup | None = None) -> None:
        self.config = config
        self.policy = make_policy(config.policy)
        self.prefix_lookup: PrefixLookup = prefix_lookup or NoPrefixCache()
        self.mixed_pool = MixedPool(config.mixed_pool)
        # Set by whoever wants every decision (tests comparing the live cluster and simulator).
        self.recorder: DecisionRecorder | None = None

    def rebalance(self, workers: Sequence[WorkerView], now: float) -> list[RoleChange]:
        """Mixed-pool role changes due now (apply them before taking the next snapshot)."""
        return self.mixed_pool.rebalance(workers, now)

    def schedule(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        """A Pairing, or a Rejection naming the limit no pair could respect."""
        decision = self._decide(request, workers)
        if self.recorder is not None:
            self.recorder.record(DecisionRecord(request, tuple(workers), decision))
        return decision

    def _decide(self, request: RequestView, workers: Sequence[WorkerView]) -> Decision:
        adm = self.config.admission
        rid = request.request_id
        if adm.max_prompt_tokens and request.prompt_len > adm.max_prompt_tokens:
            return Rejection(
                rid,
                RejectReason.PROMPT_TOO_LONG,
                f"prompt has {request.prompt_len} tokens; the limit is {adm.max_prompt_tokens}",
            )
        healthy = sorted((w for w in workers if w.schedulable), key=lambda w: w.worker_id)
        pre = [w for w in healthy if w.role in PREFILL_CAPABLE]
        dec = [w for w in healthy if w.role in DECODE_CAPABLE]
        if not dec:
            return Rejection(
                rid, RejectReason.NO_HEALTHY_WORKER, "no healthy decode-capable worker"
            )
        need = kv_need_tokens(request, adm)
        capacity = max(kv_capacity_tokens(w, adm) for w in dec)
        if need > capacity:
            return Rejection(
                rid,
                RejectReason.PROMPT_TOO_LONG,
                f"request needs {need} KV tokens; the largest decode worker can hold {capacity}",
            )
        dec_ok = [w for w in dec if decode_fits(w, need, adm)]

        # Conditional disaggregation; with no prefill-capable worker left, every prompt runs in
        # place (degraded, but served).
        if self.config.conditional_disaggregation or not pre:
            pairing = self._in_place(request, dec_ok, any_length=not pre)
            if pairing is not None:
                return pairing
        if not pre:
            if not dec_ok:
                return self._kv_exhausted(request, need)
            return self._queue_full(request)

        pre_ok = [w for w in pre if prefill_fits(w, request.prompt_len, adm)]
        if not pre_ok:
            return self._queue_full(request)
        p = self.policy.pick_prefill(request, pre_ok)
        cached_p = self._cached_tokens(p, request)
        if p.role == "mixed" and decode_fits(p, need, adm):
            # A mixed worker runs both phases itself: no handoff to pay for.
            return Pairing(rid, p.worker_id, p.worker_id, "in_place", cached_p)
        others = [w for w in dec_ok if w.worker_id != p.worker_id]
        if not others:
            return self._kv_exhausted(request, need)
        d = self.policy.pick_decode(request, others)
        return Pairing(rid, p.worker_id, d.worker_id, "disaggregated", cached_p)

    def _in_place(
        self, request: RequestView, dec_ok: list[WorkerView], any_length: bool
    ) -> Pairing | None:
        """Prefill on a decode worker when little of the prompt is left to compute there."""
        adm = self.config.admission
        limit = self.config.in_place_max_tokens
        eligible: list[tuple[WorkerView, int]] = []
        for w in dec_ok:
            cached = self._cached_tokens(w, request)
            uncached = request.prompt_len - cached
            if (any_length or uncached <= limit) and prefill_fits(w, uncached, adm):
                eligible.append((w, cached))
        if not eligible:
            return None
        most = max(c for _, c in eligible)
        # The worker caching the longest prefix wins; among equals the policy balances load.
        top = [w for w, c in eligible if c == most]
        w = self.policy.pick_decode(request, top)
        return Pairing(request.request_id, w.worker_id, w.worker_id, "in_place", most)

    def _cached_tokens(self, worker: WorkerView, request: RequestView) -> int:
        """Prompt tokens the worker already caches; the last token is always recomputed."""
        if not request.prefix_block_hashes:
            return 0
        blocks = self.prefix_lookup.cached_prefix_blocks(
            worker.worker_id, request.prefix_block_hashes
        )
        return min(blocks * worker.block_size, request.prompt_len - 1)

    def _queue_full(self, request: RequestView) -> Rejection:
        adm = self.config.admission
        return Rejection(
            request.request_id,
            RejectReason.QUEUE_FULL,
            "every prefill-capable worker is at its queue limit "
            f"(max_queue_len={adm.max_queue_len}, "
            f"max_pending_prefill_tokens={adm.max_pending_prefill_tokens})",
        )

    def _kv_exhausted(self, request: RequestView, need: int) -> Rejection:
        return Rejection(
            request.request_id,
            RejectReason.KV_EXHAUSTED,
            f"no decode-capable worker has {need} free KV tokens plus its headroom "
            f"({self.config.admission.kv_headroom_fraction:.0%})",
        )


def assume_assigned(
    workers: Sequence[WorkerView], request: RequestView, pairing: Pairing, reserve_tokens: int = 0
) -> list[WorkerView]:
    """Snapshots updated as if `pairing` had already landed (for a burst decided on one snapshot).

    The prefill side gains the uncached prompt as pending work and one waiting request; the
    decode side loses the KV blocks the request will occupy (prompt plus `reserve_tokens`).
    """
    out: list[WorkerView] = []
    uncached = request.prompt_len - pairing.cached_prefix_tokens
    for w in workers:
        if w.worker_id == pairing.prefill_worker:
            w = dataclasses.replace(
                w, pending_prefill_tokens=w.pending_prefill_tokens + uncached, waiting=w.waiting + 1
            )
        if w.worker_id == pairing.decode_worker:
            blocks = -(-(request.prompt_len + reserve_tokens) // w.block_size)
            w = dataclasses.replace(w, num_free_blocks=max(0, w.num_free_blocks - blocks))
        out.append(w)
    return out

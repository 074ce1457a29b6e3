"""Splitwise's mixed pool: lend workers across phases under pressure, give them back after.

Stateless about *who* is borrowed (a worker's view says its home role and current role), so a
restarted controller picks up where it was; the only state is the time of the last change.
"""

from __future__ import annotations

from collections.abc import Sequence

from batonserve.cluster.scheduling.config import MixedPoolConfig
from batonserve.cluster.scheduling.policies.base import argmin
from batonserve.cluster.scheduling.types import (
    DECODE_CAPABLE,
    PREFILL_CAPABLE,
    RoleChange,
    WorkerView,
)


class MixedPool:
    """Decides role changes from snapshots; the caller applies them (at most one per call)."""

    def __init__(self, config: MixedPoolConfig) -> None:
        self.config = config
        self._last_change = float("-inf")

    def rebalance(self, workers: Sequence[WorkerView], now: float) -> list[RoleChange]:
        """Role changes to apply now: returns before borrows, with hysteresis and a cooldown."""
        cfg = self.config
        if not cfg.enabled or now - self._last_change < cfg.cooldown_s:
            return []
        healthy = sorted((w for w in workers if w.schedulable), key=lambda w: w.worker_id)
        pre = [w for w in healthy if w.role in PREFILL_CAPABLE]
        dec = [w for w in healthy if w.role in DECODE_CAPABLE]
        if not pre or not dec:
            return []
        prefill_load = sum(w.pending_prefill_tokens for w in pre) / len(pre)
        total_blocks = sum(w.num_total_blocks for w in dec)
        used_blocks = sum(w.num_total_blocks - w.num_free_blocks for w in dec)
        kv_usage = used_blocks / total_blocks if total_blocks else 0.0
        prefill_hot = prefill_load >= cfg.borrow_prefill_tokens
        decode_hot = kv_usage >= cfg.borrow_decode_kv_usage

        change = self._decide(healthy, prefill_load, kv_usage, prefill_hot, decode_hot, now)
        if change is None:
            return []
        self._last_change = now
        return [change]

    def _decide(
        self,
        healthy: list[WorkerView],
        prefill_load: float,
        kv_usage: float,
        prefill_hot: bool,
        decode_hot: bool,
        now: float,
    ) -> RoleChange | None:
        cfg = self.config
        lent_decode = [w for w in healthy if w.home_role == "decode" and w.role == "mixed"]
        if lent_decode and prefill_load <= cfg.return_prefill_tokens:
            # The one with the least prompt work left goes home first: it has least to finish.
            w = argmin(lent_decode, lambda w: (w.pending_prefill_tokens, w.waiting))
            return RoleChange(w.worker_id, "return", "mixed", "decode", "prefill_pressure", now)
        lent_prefill = [w for w in healthy if w.home_role == "prefill" and w.role == "mixed"]
        if lent_prefill and kv_usage <= cfg.return_decode_kv_usage:
            w = argmin(lent_prefill, lambda w: (w.running, w.kv_usage))
            return RoleChange(w.worker_id, "return", "mixed", "prefill", "decode_pressure", now)
        if prefill_hot and not decode_hot:
            idle_decode = [w for w in healthy if w.home_role == "decode" and w.role == "decode"]
            if len(idle_decode) > cfg.min_decode_workers:
                # The emptiest decode worker has the most room to absorb prompts.
                w = argmin(idle_decode, lambda w: (w.kv_usage, w.running))
                return RoleChange(w.worker_id, "borrow", "decode", "mixed", "prefill_pressure", now)
        if decode_hot and not prefill_hot:
            idle_prefill = [w for w in healthy if w.home_role == "prefill" and w.role == "prefill"]
            if len(idle_prefill) > cfg.min_prefill_workers:
                w = argmin(idle_prefill, lambda w: (w.pending_prefill_tokens, w.waiting))
                return RoleChange(w.worker_id, "borrow", "prefill", "mixed", "decode_pressure", now)
        return None

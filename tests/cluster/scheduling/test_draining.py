"""Draining workers (scale-down) get no new pairing and no mixed-pool role change."""

from __future__ import annotations

import dataclasses
import random

from sched_helpers import worker

from batonserve.cluster.scheduling import (
    ClusterScheduler,
    MixedPoolConfig,
    Pairing,
    RequestView,
    SchedulerConfig,
)


def _drain(w, on: bool = True):  # type: ignore[no-untyped-def]
    return dataclasses.replace(w, draining=on)


def test_seeded_random_snapshots_never_pair_a_draining_worker() -> None:
    rng = random.Random(17)
    for mode in (True, False):
        cls = ClusterScheduler(SchedulerConfig(conditional_disaggregation=mode))
        paired = 0
        for i in range(300):
            ws = [
                worker(f"prefill-{k}", "prefill", pending=rng.randrange(0, 5000)) for k in range(3)
            ] + [worker(f"decode-{k}", "decode", free=rng.randrange(5, 100)) for k in range(3)]
            # Drain some, never every worker of a role (the controller keeps one of each pool).
            ws = [_drain(w, rng.random() < 0.5 and not w.worker_id.endswith("-0")) for w in ws]
            d = cls.schedule(RequestView(f"r{i}", rng.randrange(1, 900), 8), ws)
            if not isinstance(d, Pairing):
                continue  # a full decode-0 may refuse; what matters is who gets paired
            paired += 1
            draining = {w.worker_id for w in ws if w.draining}
            assert d.prefill_worker not in draining and d.decode_worker not in draining
        assert paired > 200


def test_only_draining_decode_workers_means_no_decode_worker() -> None:
    ws = [worker("prefill-0", "prefill"), _drain(worker("decode-0", "decode"))]
    d = ClusterScheduler(SchedulerConfig()).schedule(RequestView("r", 100, 8), ws)
    assert not isinstance(d, Pairing)


def test_mixed_pool_never_borrows_a_draining_worker() -> None:
    cfg = MixedPoolConfig(borrow_prefill_tokens=1000, return_prefill_tokens=100, cooldown_s=0.0)
    cls = ClusterScheduler(SchedulerConfig(mixed_pool=cfg))
    ws = [
        worker("prefill-0", "prefill", pending=9000),
        worker("decode-0", "decode", free=90),
        _drain(worker("decode-1", "decode", free=100)),  # the emptiest, but leaving
        worker("decode-2", "decode", free=95),
    ]
    changes = cls.rebalance(ws, now=1.0)
    assert [c.worker_id for c in changes] == ["decode-2"]

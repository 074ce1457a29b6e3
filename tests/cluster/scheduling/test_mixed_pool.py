"""The mixed pool borrows under pressure and returns with hysteresis; events are typed."""

from __future__ import annotations

import dataclasses

from sched_helpers import worker

from batonserve.cluster.scheduling import MixedPoolConfig, RoleChange, WorkerView
from batonserve.cluster.scheduling.mixed_pool import MixedPool

CFG = MixedPoolConfig(borrow_prefill_tokens=8000, return_prefill_tokens=2000, cooldown_s=0.0)


def apply(ws: list[WorkerView], events: list[RoleChange]) -> list[WorkerView]:
    by_id = {e.worker_id: e for e in events}
    return [
        dataclasses.replace(w, role=by_id[w.worker_id].to_role) if w.worker_id in by_id else w
        for w in ws
    ]


def pool(pending: int) -> list[WorkerView]:
    return [
        worker("p0", "prefill", pending=pending),
        worker("d0", "decode", free=50),
        worker("d1", "decode", free=90),
    ]


def test_prefill_pressure_borrows_the_emptiest_decode_worker_then_returns_it() -> None:
    mp = MixedPool(CFG)
    assert mp.rebalance(pool(7999), 0.0) == []
    ev = mp.rebalance(pool(16000), 1.0)
    assert ev == [RoleChange("d1", "borrow", "decode", "mixed", "prefill_pressure", 1.0)]
    ws = apply(pool(16000), ev)
    # Two prefill-capable workers share the load: 5000 each, between the thresholds: hold.
    ws = [
        dataclasses.replace(w, pending_prefill_tokens=5000) if w.role != "decode" else w for w in ws
    ]
    assert mp.rebalance(ws, 2.0) == []
    # The last decode-only worker is never lent (min_decode_workers=1).
    ws = [
        dataclasses.replace(w, pending_prefill_tokens=9000) if w.role != "decode" else w for w in ws
    ]
    assert mp.rebalance(ws, 3.0) == []
    ws = [
        dataclasses.replace(w, pending_prefill_tokens=1000) if w.role != "decode" else w for w in ws
    ]
    assert mp.rebalance(ws, 4.0) == [
        RoleChange("d1", "return", "mixed", "decode", "prefill_pressure", 4.0)
    ]


def test_decode_pressure_borrows_a_prefill_worker() -> None:
    mp = MixedPool(CFG)
    ws = [
        worker("p0", "prefill", pending=0),
        worker("p1", "prefill", pending=500),
        worker("d0", "decode", free=5),
    ]
    ev = mp.rebalance(ws, 0.0)
    assert ev == [RoleChange("p0", "borrow", "prefill", "mixed", "decode_pressure", 0.0)]
    ws = apply(ws, ev)
    # Usage over decode-capable workers is now (95 + 0) / 200 = 0.475 <= 0.6: give it back.
    assert mp.rebalance(ws, 1.0)[0].kind == "return"


def test_cooldown_and_disabled() -> None:
    mp = MixedPool(dataclasses.replace(CFG, cooldown_s=5.0))
    assert len(mp.rebalance(pool(20000), 0.0)) == 1
    assert mp.rebalance(pool(20000), 4.9) == []
    assert MixedPool(dataclasses.replace(CFG, enabled=False)).rebalance(pool(20000), 0.0) == []

"""Handoff lifecycle state machine: leases, acks, idempotent aborts, stale acks."""

from __future__ import annotations

import pytest

from batonserve.cluster.handoff import HandoffLedger, HandoffState


class Clock:
    """A manual clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ack_then_release_completes() -> None:
    clock = Clock()
    ledger = HandoffLedger(2.0, clock)
    h = ledger.open("r#1", "prefill-0", "decode-0")
    assert h.state is HandoffState.OPEN and h.deadline == 102.0
    clock.now = 101.5
    assert ledger.prefilled(h.handoff_id)
    assert h.deadline == 103.5  # progress renews the lease
    assert ledger.committed(h.handoff_id, nbytes=640)
    clock.now = 1000.0
    assert ledger.expired() == []  # a committed handoff no longer has a lease
    ledger.released(h.handoff_id)
    assert h.state is HandoffState.RELEASED and ledger.live() == []


def test_lease_expiry_aborts_once() -> None:
    clock = Clock()
    ledger = HandoffLedger(1.0, clock)
    a = ledger.open("r#1", "prefill-0", "decode-0")
    b = ledger.open("s#1", "prefill-0", "decode-1")
    clock.now = 100.5
    assert ledger.prefilled(b.handoff_id)
    clock.now = 101.0
    assert ledger.expired() == [a]
    assert a.state is HandoffState.ABORTED and a.reason == "lease_expired"
    assert ledger.expired() == []  # idempotent
    assert ledger.abort(a.handoff_id, "again") is None
    # The late ack of an expired handoff is stale: the caller must drop the decode copy.
    assert not ledger.committed(a.handoff_id)
    clock.now = 101.6
    assert ledger.expired() == [b]


def test_abort_is_idempotent_and_committed_is_final() -> None:
    ledger = HandoffLedger(5.0, Clock())
    h = ledger.open("r#1", "p", "d")
    assert ledger.abort(h.handoff_id, "client left") is h
    assert ledger.abort(h.handoff_id, "client left") is None
    assert not ledger.prefilled(h.handoff_id)
    g = ledger.open("r#2", "p", "d")
    assert g.handoff_id != h.handoff_id  # ids are never reused: stale chunks can't match
    assert ledger.committed(g.handoff_id)
    assert ledger.abort(g.handoff_id, "too late") is None  # the decode side owns it now
    assert ledger.involving("d") == [g]
    ledger.released(g.handoff_id)
    assert ledger.involving("d") == []


def test_bad_lease_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"kv_transfer\.lease_s"):
        HandoffLedger(0.0)

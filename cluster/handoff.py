"""Handoff lifecycle: every KV handoff has an owner (the cluster), a lease and a state machine.

    OPEN --first token--> PREFILLED --decode side acks--> COMMITTED --prefill side frees--> RELEASED
      \\_______________________ lease ends / failure / abort ______________________> ABORTED

A lease is renewed on progress, not only at the first token: while the prefill worker reports
the request queued or prefilling (and sending, layer by layer), and while the decode worker
reports the complete handoff waiting for free blocks, so a long queue is never re-prefilled.

Plain Python with an injected clock: the live cluster and the tests drive the same object. Each
transition returns what the caller must do (free the prefill blocks, or abort both sides), and
every transition out of a final state is a no-op, so aborts are idempotent and a late ack of an
aborted handoff is recognised as stale (the caller aborts that copy on the decode side).
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class HandoffState(enum.Enum):
    """Where a handoff is in its life."""

    OPEN = "open"  # prefill running, KV streaming layer by layer
    PREFILLED = "prefilled"  # first token sampled, last layers in flight
    COMMITTED = "committed"  # decode side has every layer and decodes; prefill blocks to free
    RELEASED = "released"  # prefill side freed its blocks: done
    ABORTED = "aborted"  # lease ended, a worker failed, or the request was aborted

    @property
    def final(self) -> bool:
        """No transition leaves this state."""
        return self in (HandoffState.RELEASED, HandoffState.ABORTED)


@dataclass
class Handoff:
    """One handoff of one request attempt."""

    handoff_id: int
    request_id: str  # worker-level id of the attempt
    src: str  # prefill worker: holds the blocks until release
    dst: str  # decode worker
    deadline: float  # lease end (renewed on progress)
    opened_at: float
    state: HandoffState = HandoffState.OPEN
    reason: str = ""
    nbytes: int = 0
    committed_at: float = 0.0

    @property
    def live(self) -> bool:
        """Not yet released or aborted."""
        return not self.state.final


class HandoffLedger:
    """Owns every handoff: opens them, renews and ends their leases, aborts them once."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_s <= 0:
            raise ValueError(f"kv_transfer.lease_s: must be > 0, got {lease_s}")
        self.lease_s = lease_s
        self.clock = clock
        self._ids = itertools.count(1)
        self.handoffs: dict[int, Handoff] = {}

    def open(self, request_id: str, src: str, dst: str) -> Handoff:
        """A new handoff owned by this ledger; the lease starts now."""
        assert src != dst, "a handoff always crosses workers"
        now = self.clock()
        h = Handoff(next(self._ids), request_id, src, dst, now + self.lease_s, now)
        self.handoffs[h.handoff_id] = h
        return h

    def get(self, handoff_id: int) -> Handoff | None:
        """The handoff, live or not (until forgotten)."""
        return self.handoffs.get(handoff_id)

    def prefilled(self, handoff_id: int) -> bool:
        """The first token came out: renew the lease for the last layers; False if not live."""
        h = self.handoffs.get(handoff_id)
        if h is None or h.state is not HandoffState.OPEN:
            return False
        h.state = HandoffState.PREFILLED
        h.deadline = self.clock() + self.lease_s
        return True

    def renew(self, handoff_ids: Iterable[int]) -> None:
        """Progress was reported on these handoffs: their leases start again (live ones only)."""
        deadline = self.clock() + self.lease_s
        for hid in handoff_ids:
            h = self.handoffs.get(hid)
            if h is not None and h.state in (HandoffState.OPEN, HandoffState.PREFILLED):
                h.deadline = max(h.deadline, deadline)

    def committed(self, handoff_id: int, nbytes: int = 0) -> bool:
        """The decode side acknowledged: True means free the prefill blocks now; False means the
        ack is stale (the handoff was aborted) and the decode side's copy must be aborted."""
        h = self.handoffs.get(handoff_id)
        if h is None or h.state not in (HandoffState.OPEN, HandoffState.PREFILLED):
            return False
        h.state = HandoffState.COMMITTED
        h.nbytes = nbytes
        h.committed_at = self.clock()
        return True

    def released(self, handoff_id: int) -> None:
        """The prefill side was told to free its blocks: the handoff is done."""
        h = self.handoffs.get(handoff_id)
        if h is not None and h.state is HandoffState.COMMITTED:
            h.state = HandoffState.RELEASED
            del self.handoffs[handoff_id]

    def abort(self, handoff_id: int, reason: str) -> Handoff | None:
        """Abort if live and not yet committed; returns it the first time only (idempotent).

        A committed handoff is past the point of no return: the decode side owns the request.
        """
        h = self.handoffs.get(handoff_id)
        if h is None or h.state not in (HandoffState.OPEN, HandoffState.PREFILLED):
            return None
        h.state = HandoffState.ABORTED
        h.reason = reason
        del self.handoffs[handoff_id]
        return h

    def expired(self) -> list[Handoff]:
        """Abort and return every unacknowledged handoff whose lease has ended."""
        now = self.clock()
        due = [
            h.handoff_id
            for h in self.handoffs.values()
            if h.state in (HandoffState.OPEN, HandoffState.PREFILLED) and now >= h.deadline
        ]
        return [h for hid in due if (h := self.abort(hid, "lease_expired")) is not None]

    def involving(self, worker: str) -> list[Handoff]:
        """Live handoffs with `worker` on either side."""
        return [h for h in self.handoffs.values() if worker in (h.src, h.dst)]

    def live(self) -> list[Handoff]:
        """Every handoff not yet released or aborted."""
        return list(self.handoffs.values())

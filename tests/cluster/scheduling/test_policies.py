"""Each pairing policy picks what its rule says, with stable tie-breaking."""

from __future__ import annotations

import pytest
from sched_helpers import worker

from batonserve.cluster.scheduling import POLICIES, RequestView, make_policy
from batonserve.cluster.schema import ConfigError

REQ = RequestView("r", prompt_len=100, max_tokens=10)


def test_registry_lists_the_three_policies_and_rejects_unknown() -> None:
    assert set(POLICIES.names()) >= {"round_robin", "jsq", "splitwise"}
    with pytest.raises(ConfigError, match=r"scheduler\.policy"):
        make_policy("nope")


def test_round_robin_cycles_by_id_and_survives_a_worker_leaving() -> None:
    p = make_policy("round_robin")
    ws = [worker(f"d-{i}", "decode") for i in range(3)]
    assert [p.pick_decode(REQ, ws).worker_id for _ in range(4)] == ["d-0", "d-1", "d-2", "d-0"]
    # d-1 disappears: the cycle continues after the last pick (d-0) with d-2.
    assert p.pick_decode(REQ, [ws[0], ws[2]]).worker_id == "d-2"
    # Phases keep independent cursors.
    assert p.pick_prefill(REQ, ws).worker_id == "d-0"


def test_jsq_counts_requests_not_tokens() -> None:
    p = make_policy("jsq")
    a = worker("a", "prefill", pending=10_000, waiting=1)
    b = worker("b", "prefill", pending=10, waiting=3)
    assert p.pick_prefill(REQ, [a, b]).worker_id == "a"
    assert (
        p.pick_decode(
            REQ, [worker("x", "decode", running=2), worker("y", "decode", running=2)]
        ).worker_id
        == "x"
    )


def test_splitwise_prefill_by_pending_tokens_decode_by_free_kv() -> None:
    p = make_policy("splitwise")
    a = worker("a", "prefill", pending=10_000, waiting=1)
    b = worker("b", "prefill", pending=10, waiting=3)
    assert p.pick_prefill(REQ, [a, b]).worker_id == "b"
    x = worker("x", "decode", free=10, running=0)
    y = worker("y", "decode", free=90, running=5)
    z = worker("z", "decode", free=90, running=2)
    assert p.pick_decode(REQ, [x, y, z]).worker_id == "z"


def test_splitwise_idle_prefill_tie_goes_to_the_worker_not_decoding() -> None:
    # Colocated (mixed) workers all have zero pending prompt tokens when lightly loaded; the one
    # already decoding must not get every new prompt just because its id sorts first.
    p = make_policy("splitwise")
    busy = worker("m-0", "mixed", pending=0, running=3)
    idle = worker("m-1", "mixed", pending=0, running=0)
    assert p.pick_prefill(REQ, [busy, idle]).worker_id == "m-1"

"""A disaggregated request's first token has one way back: the prefill side's output, with its
logprobs, consumed as is by the router. Decode outputs that overtake it wait behind it, and a
prefill worker that dies before that output is read takes the attempt with it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from batonserve.cluster import worker_events
from batonserve.cluster.api import GenerateRequest, TokenDelta
from batonserve.cluster.request_state import RequestState
from batonserve.cluster.request_table import RequestTable
from batonserve.cluster.worker_events import WorkerEvents
from batonserve.workers.output_processor import OutputProcessor
from batonserve.workers.outputs import CoreOutput, TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.worker_types import HandoffEvent

PROMPT = (5, 6, 7)


def _lp(token: int) -> TokenLogprobs:
    return TokenLogprobs(token, -0.5 - token / 100, ((token, -0.5 - token / 100), (1, -3.0)))


def _setup(logprobs: int | None = 1) -> tuple[WorkerEvents, RequestState, list[RequestState]]:
    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=logprobs, ignore_eos=True)
    st = RequestState(GenerateRequest("r", PROMPT, params))
    a = st.next_attempt("prefill-0", "decode-0")
    a.handoff_id = 7
    requests = RequestTable()
    requests.add(st)
    requests.bind(st, a)
    processor = OutputProcessor(None)
    processor.add_request("r", PROMPT, params)
    finished: list[RequestState] = []
    handoff = SimpleNamespace(src="prefill-0")
    cluster = SimpleNamespace(
        requests=requests,
        processor=processor,
        ledger=SimpleNamespace(
            prefilled=lambda hid: None,
            get=lambda hid: handoff,
            committed=lambda hid, nbytes: True,
            released=lambda hid: None,
        ),
        observer=SimpleNamespace(kv_handoff=lambda rec: None),
        controller=SimpleNamespace(workers={}),
        ring_routes=SimpleNamespace(targets=lambda worker, rid: (worker,)),
        _finish=finished.append,
        restart=lambda st, why: None,
    )
    return WorkerEvents(cluster), st, finished  # type: ignore[arg-type]


def _out(st: RequestState, tokens: tuple[int, ...], prefilled: bool = False) -> CoreOutput:
    assert st.attempt is not None
    lps = tuple(_lp(t) for t in tokens)
    return CoreOutput(st.attempt.worker_request_id, tokens, lps, False, None, prefilled, 3, 1, 0)


@pytest.fixture(autouse=True)
def _no_handoff_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit's metrics record needs a controller; these tests look at tokens only."""
    monkeypatch.setattr(worker_events, "handoff_record", lambda *a: None)


def _commit(events: WorkerEvents, st: RequestState) -> None:
    assert st.attempt is not None
    events.on_event("decode-0", HandoffEvent(7, st.attempt.worker_request_id, "committed", 100))


def _drain(st: RequestState) -> list[TokenDelta]:
    out = []
    while not st.queue.empty():
        item = st.queue.get_nowait()
        assert isinstance(item, TokenDelta)
        out.append(item)
    return out


def test_decode_outputs_wait_for_the_prefill_sides_first_token() -> None:
    events, st, _ = _setup()
    _commit(events, st)  # the commit names no token: nothing is streamed
    assert st.queue.empty()
    events.on_output("decode-0", _out(st, (41,)))
    events.on_output("decode-0", _out(st, (42,)))
    assert st.queue.empty()  # held behind the first token
    events.on_output("prefill-0", _out(st, (40,), prefilled=True))
    out = _drain(st)
    assert [t for d in out for t in d.token_ids] == [40, 41, 42]
    lps = [lp for d in out for lp in d.logprobs]
    assert lps == [_lp(40), _lp(41), _lp(42)]  # the first token's logprobs survived
    assert st.produced == [40, 41, 42]


def test_the_first_token_is_delivered_exactly_once_in_either_order() -> None:
    for commit_first in (True, False):
        events, st, _ = _setup(logprobs=None)
        if commit_first:
            _commit(events, st)
        events.on_output("prefill-0", _out(st, (40,), prefilled=True))
        if not commit_first:
            _commit(events, st)
        events.on_output("decode-0", _out(st, (41,)))
        out = _drain(st)
        assert [t for d in out for t in d.token_ids] == [40, 41]
        assert all(d.logprobs == () for d in out)  # none asked for, none sent
        assert st.produced == [40, 41]


def test_the_prefill_worker_matters_until_its_first_token_is_in() -> None:
    events, st, _ = _setup()
    a = st.attempt
    assert a is not None
    _commit(events, st)
    assert a.phase == "decode" and a.uses("prefill-0")  # its death must resume the request
    events.on_output("prefill-0", _out(st, (40,), prefilled=True))
    assert not a.uses("prefill-0") and a.uses("decode-0")


def test_a_first_token_that_ends_the_request_finishes_it() -> None:
    events, st, finished = _setup()
    assert st.attempt is not None
    rid = st.attempt.worker_request_id
    last = CoreOutput(rid, (40,), (_lp(40),), True, "stop", True, 3, 1, 0)
    events.on_output("prefill-0", last)
    (d,) = _drain(st)
    assert d.token_ids == (40,) and d.finish_reason == "stop" and d.logprobs == (_lp(40),)
    assert finished == [st]

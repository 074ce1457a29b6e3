"""A disaggregated request's first token keeps its logprobs when the KV commit overtakes it.

The decode side's commit event names the first token but not its logprobs (only the prefill
side's delta has them): decode tokens wait behind it, briefly, and the stream stays in order.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from batonserve.cluster.api import GenerateRequest, TokenDelta
from batonserve.cluster.request_state import RequestState
from batonserve.cluster.worker_events import HOLD_TOKENS, WorkerEvents
from batonserve.workers.output_processor import OutputProcessor
from batonserve.workers.outputs import TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.worker_types import RequestDelta

PROMPT = (5, 6, 7)


def _lp(token: int) -> TokenLogprobs:
    return TokenLogprobs(token, -0.5 - token / 100, ((token, -0.5 - token / 100), (1, -3.0)))


def _setup() -> tuple[Any, RequestState]:
    params = SamplingParams(max_tokens=20, temperature=0.0, logprobs=1, ignore_eos=True)
    st = RequestState(GenerateRequest("r", PROMPT, params))
    a = st.next_attempt("prefill-0", "decode-0")
    a.phase = "decode"  # as the commit left it
    a.first_token_held = 40  # ... holding the first token it named
    processor = OutputProcessor(None)
    processor.add_request("r", PROMPT, params)
    finished: list[RequestState] = []
    cluster = SimpleNamespace(
        by_worker_rid={a.worker_request_id: st},
        processor=processor,
        ledger=SimpleNamespace(prefilled=lambda hid: None),
        _finish=finished.append,
        restart=lambda st, why: None,
    )
    return cluster, st


def _delta(st: RequestState, tokens: tuple[int, ...], prefilled: bool = False) -> RequestDelta:
    assert st.attempt is not None
    lps = tuple(_lp(t) for t in tokens)
    return RequestDelta(st.attempt.worker_request_id, tokens, False, None, prefilled, 3, 0, "", lps)


def _drain(st: RequestState) -> list[TokenDelta]:
    out = []
    while not st.queue.empty():
        item = st.queue.get_nowait()
        assert isinstance(item, TokenDelta)
        out.append(item)
    return out


def test_decode_tokens_wait_for_the_prefill_report_of_the_first_token() -> None:
    cluster, st = _setup()
    WorkerEvents._on_delta(cluster, "decode-0", _delta(st, (41,)))
    WorkerEvents._on_delta(cluster, "decode-0", _delta(st, (42,)))
    assert st.queue.empty()  # held behind the first token
    WorkerEvents._on_delta(cluster, "prefill-0", _delta(st, (40,), prefilled=True))
    out = _drain(st)
    assert [t for d in out for t in d.token_ids] == [40, 41, 42]
    lps = [lp for d in out for lp in d.logprobs]
    assert lps == [_lp(40), _lp(41), _lp(42)]  # the first token's logprobs survived
    assert st.produced == [40, 41, 42]


def test_a_late_prefill_report_does_not_stall_the_stream() -> None:
    cluster, st = _setup()
    for t in range(HOLD_TOKENS):
        WorkerEvents._on_delta(cluster, "decode-0", _delta(st, (50 + t,)))
    out = _drain(st)
    tokens = [t for d in out for t in d.token_ids]
    assert tokens == [40, *range(50, 50 + HOLD_TOKENS)]  # in order, the first one bare
    assert out[0].logprobs == (None,)
    WorkerEvents._on_delta(cluster, "prefill-0", _delta(st, (40,), prefilled=True))
    assert st.queue.empty()  # the late report is not streamed a second time

"""Worker to router, for real: a request prefilled on one worker and decoded on another (tiny
Llama, gloo KV channel, in-process) reaches the router's stream with every token once and every
token's logprobs, the first one included, equal to the offline engine's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from batonserve.cluster.api import GenerateRequest, TokenDelta
from batonserve.cluster.request_state import RequestState
from batonserve.cluster.request_table import RequestTable
from batonserve.cluster.worker_events import WorkerEvents
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.kv_transfer import KVTransferConfig
from batonserve.workers.output_processor import OutputProcessor
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.worker import Worker
from batonserve.workers.worker_types import HandoffSpec, WorkerSpec

PROMPT = (0, *range(30, 50))
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
ENGINE = EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32")


@pytest.fixture(scope="module")
def pair(tiny_model: Callable[[str], Path]) -> Iterator[tuple[Worker, Worker]]:
    torch.set_num_threads(1)
    model = str(tiny_model("llama"))
    kv = KVTransferConfig(send_timeout_s=5, connect_timeout_s=20)
    p = Worker(WorkerSpec("prefill-0", "prefill", "prefill", model, engine=ENGINE, kv=kv))
    d = Worker(WorkerSpec("decode-0", "decode", "decode", model, engine=ENGINE, kv=kv))
    addr = p.kv_listen("decode-0")
    t = threading.Thread(target=d.kv_connect, args=("prefill-0", addr, False))
    t.start()
    p.kv_connect("decode-0", addr, True)
    t.join()
    yield p, d
    p.shutdown()
    d.shutdown()


def _router_side(p: Worker) -> tuple[WorkerEvents, RequestState, list[RequestState]]:
    """The cluster's reactions over one request, with the ledger and observer stubbed out."""
    st = RequestState(GenerateRequest("r", PROMPT, PARAMS))
    a = st.next_attempt("prefill-0", "decode-0")
    a.handoff_id = 1
    requests = RequestTable()
    requests.add(st)
    requests.bind(st, a)
    processor = OutputProcessor(None)
    processor.add_request("r", PROMPT, PARAMS)
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
        ring_routes=SimpleNamespace(targets=lambda worker, rid: ()),
        _finish=finished.append,
        restart=lambda st, why: pytest.fail(f"restarted: {why}"),
    )
    events = WorkerEvents(cluster)  # type: ignore[arg-type]
    events.release_on = lambda worker, rid: p.release(rid)  # type: ignore[method-assign]
    return events, st, finished


def test_first_token_logprobs_survive_the_handoff(
    pair: tuple[Worker, Worker], tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from batonserve.cluster import worker_events

    monkeypatch.setattr(worker_events, "handoff_record", lambda *a: None)
    want = Engine(tiny_model("llama"), ENGINE).generate(list(PROMPT), PARAMS)[0]
    p, d = pair
    events, st, finished = _router_side(p)
    assert st.attempt is not None
    spec = HandoffSpec(1, st.attempt.worker_request_id, "prefill-0", "decode-0", PROMPT, PARAMS)
    d.begin_import(spec)
    p.submit_prefill(spec)
    deadline = time.monotonic() + 60
    while not finished and time.monotonic() < deadline:
        for w in (p, d):
            r = w.poll(0.02)
            assert r.stats.healthy, r.stats.error
            for ev in r.events:
                events.on_event(w.spec.name, ev)
            for out in r.deltas:
                events.on_output(w.spec.name, out)
    assert finished == [st], "the request did not finish in 60 s"
    deltas: list[TokenDelta] = []
    while not st.queue.empty():
        item = st.queue.get_nowait()
        assert isinstance(item, TokenDelta)
        deltas.append(item)
    tokens = [t for x in deltas for t in x.token_ids]
    lps = [lp for x in deltas for lp in x.logprobs]
    assert tokens == want.token_ids and st.produced == want.token_ids  # each token once
    assert len(lps) == len(tokens) and all(lp is not None for lp in lps)
    for got, ref in zip(lps, want.logprobs, strict=True):
        assert got is not None and ref is not None
        assert got.token_id == ref.token_id
        assert got.logprob == pytest.approx(ref.logprob, abs=1e-5)

"""Worker actor bodies in one process (no Ray), fake engine with scripted tokens, gloo channel:
layer-wise handoff, lease expiry, idempotent aborts, no stale KV decoded from."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from batonserve.cluster.handoff import HandoffLedger
from batonserve.workers.kv_transfer import KVTransferConfig
from batonserve.workers.outputs import CoreOutput
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngine, ScriptedEngineConfig
from batonserve.workers.worker import Worker
from batonserve.workers.worker_types import HandoffEvent, HandoffSpec, WorkerSpec

# Small prefill chunks: a prompt spans several steps, so KV leaves in several chunks per layer.
SC = ScriptedEngineConfig(
    num_layers=3, num_kv_heads=2, head_dim=4, block_size=4, max_num_batched_tokens=8
)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def reference(prompt: list[int], params: SamplingParams) -> list[int]:
    """The same request on one fake engine, no handoff."""
    eng = ScriptedEngine(SC)
    eng.add_request("r", prompt, params)
    out: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            out += o.new_token_ids
    return out


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Worker, Worker]]:
    torch.set_num_threads(1)
    kv = KVTransferConfig(send_timeout_s=5, connect_timeout_s=20)
    p = Worker(WorkerSpec("prefill-0", "prefill", "prefill", "scripted", kv=kv, scripted=SC))
    d = Worker(WorkerSpec("decode-0", "decode", "decode", "scripted", kv=kv, scripted=SC))
    addr = p.kv_listen("decode-0")
    t = threading.Thread(target=d.kv_connect, args=("prefill-0", addr, False))
    t.start()
    p.kv_connect("decode-0", addr, True)
    t.join()
    yield p, d
    p.shutdown()
    d.shutdown()


def drain(
    workers: tuple[Worker, ...], until: float, stop: object = None
) -> tuple[list[tuple[str, CoreOutput]], list[tuple[str, HandoffEvent]]]:
    """Poll every worker for `until` seconds (or until `stop(deltas, events)` is true)."""
    deltas: list[tuple[str, CoreOutput]] = []
    events: list[tuple[str, HandoffEvent]] = []
    end = time.monotonic() + until
    while time.monotonic() < end:
        for w in workers:
            r = w.poll(0.02)
            assert r.stats.healthy, r.stats.error
            deltas += [(w.spec.name, d) for d in r.deltas]
            events += [(w.spec.name, e) for e in r.events]
        if callable(stop) and stop(deltas, events):
            break
    return deltas, events


def idle(*workers: Worker) -> None:
    """Every block free, nothing pinned, staged or exporting."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        stats = [w.stats() for w in workers]
        if all(
            s.num_free_blocks == s.num_blocks and not s.pinned and not s.imports and not s.exports
            for s in stats
        ):
            return
        time.sleep(0.02)
    raise AssertionError(f"blocks or handoffs leaked: {[w.stats() for w in workers]}")


def run_handoff(p: Worker, d: Worker, hid: int, rid: str, prompt: list[int]) -> list[int]:
    spec = HandoffSpec(hid, rid, "prefill-0", "decode-0", tuple(prompt), GREEDY)
    d.begin_import(spec)
    p.submit_prefill(spec)
    ledger_done = []

    def finished(
        deltas: list[tuple[str, CoreOutput]], events: list[tuple[str, HandoffEvent]]
    ) -> bool:
        for _, e in events:
            if e.kind == "committed" and e.handoff_id not in ledger_done:
                ledger_done.append(e.handoff_id)
                p.release(e.request_id)  # the ack frees the prefill side
        # The prefill side sends the first-token marker before it publishes its own delta, so
        # under load the decode side can finish first: wait for both.
        done = any(n == "decode-0" and x.finished for n, x in deltas)
        return done and any(n == "prefill-0" for n, _ in deltas)

    deltas, events = drain((p, d), 10, finished)
    assert [e.kind for _, e in events] == ["committed"]
    first = [x for n, x in deltas if n == "prefill-0"]
    assert len(first) == 1 and first[0].prefilled and len(first[0].new_token_ids) == 1
    rest = [t for n, x in deltas if n == "decode-0" for t in x.new_token_ids]
    return list(first[0].new_token_ids) + rest  # the first token, then the decode side's


def test_layerwise_handoff_is_token_identical_and_frees_both_sides(
    pair: tuple[Worker, Worker],
) -> None:
    p, d = pair
    prompt = [(5 * i) % 90 + 3 for i in range(21)]
    assert run_handoff(p, d, 1, "a#1", prompt) == reference(prompt, GREEDY)
    # Same 16-token prefix: the prefill side hits its prefix cache, and the cached KV must move too.
    prompt2 = [*prompt[:16], 7, 8, 9]
    assert run_handoff(p, d, 2, "b#1", prompt2) == reference(prompt2, GREEDY)
    assert p.stats().prefix_hits > 0
    idle(p, d)


def test_lease_expiry_frees_unacknowledged_handoff(pair: tuple[Worker, Worker]) -> None:
    p, d = pair
    now = [0.0]
    ledger = HandoffLedger(1.0, clock=lambda: now[0])
    prompt = list(range(10, 40))
    h = ledger.open("c#1", "prefill-0", "decode-0")
    # The decode side never learned of it (lost begin_import): its chunks are dropped there,
    # so no ack comes and the prefill side keeps its blocks pinned...
    p.submit_prefill(
        HandoffSpec(h.handoff_id, "c#1", "prefill-0", "decode-0", tuple(prompt), GREEDY)
    )
    deltas, events = drain((p, d), 1.0)
    assert events == [] and [x.prefilled for _, x in deltas] == [True]
    assert p.stats().pinned == 1 and p.stats().num_free_blocks < p.stats().num_blocks
    assert ledger.expired() == []
    now[0] = 1.5
    (expired,) = ledger.expired()
    assert expired.reason == "lease_expired"
    # ...until the lease ends and the owner aborts both sides, twice for good measure.
    for _ in range(2):
        p.abort(expired.request_id)
        d.abort(expired.request_id)
    idle(p, d)
    assert ledger.abort(expired.handoff_id, "again") is None


def test_aborted_handoff_is_never_decoded_from(pair: tuple[Worker, Worker]) -> None:
    p, d = pair
    prompt = list(range(50, 70))
    old = HandoffSpec(7, "e#1", "prefill-0", "decode-0", tuple(prompt), GREEDY)
    d.begin_import(old)
    d.abort("e#1")  # aborted before any KV arrived: late chunks of handoff 7 must be dropped
    p.submit_prefill(old)
    deltas, events = drain((p, d), 1.0)
    assert events == [] and all(n == "prefill-0" for n, _ in deltas)
    assert d.stats().imports == 0 and d.stats().running == 0
    p.abort("e#1")
    # The retry (new attempt, new handoff id) decodes from its own KV only.
    assert run_handoff(p, d, 8, "e#2", prompt) == reference(prompt, GREEDY)
    idle(p, d)


def test_first_token_ends_request_without_handoff(pair: tuple[Worker, Worker]) -> None:
    p, d = pair
    one = SamplingParams(max_tokens=1, temperature=0)
    prompt = list(range(20, 30))
    spec = HandoffSpec(9, "f#1", "prefill-0", "decode-0", tuple(prompt), one)
    d.begin_import(spec)
    p.submit_prefill(spec)
    deltas, _ = drain((p, d), 0.5)
    assert [(n, x.finished, x.finish_reason) for n, x in deltas] == [("prefill-0", True, "length")]
    assert [t for _, x in deltas for t in x.new_token_ids] == reference(prompt, one)
    d.abort("f#1")  # the owner drops the useless staging
    idle(p, d)


def test_refused_request_ends_alone(pair: tuple[Worker, Worker]) -> None:
    p, d = pair
    prompt = list(range(30, 40))
    d.submit("dup", prompt, GREEDY)
    d.submit("dup", prompt, GREEDY)  # the engine refuses a duplicate id: only that submit fails
    deltas, _ = drain((d,), 3.0, lambda ds, _: sum(x.finished for _, x in ds) >= 2)
    errors = [x for _, x in deltas if x.error]
    assert len(errors) == 1 and "already in use" in errors[0].error
    assert errors[0].finish_reason == "abort"
    assert [t for _, x in deltas for t in x.new_token_ids] == reference(prompt, GREEDY)
    assert d.health()
    idle(p, d)


def test_workers_free_handoffs_whose_owner_vanished() -> None:
    """Backstop: with no cluster left to end the lease, each side frees its part after 2 leases."""
    kv = KVTransferConfig(lease_s=0.2, send_timeout_s=5, connect_timeout_s=20)
    p = Worker(WorkerSpec("prefill-1", "prefill", "prefill", "scripted", kv=kv, scripted=SC))
    d = Worker(WorkerSpec("decode-1", "decode", "decode", "scripted", kv=kv, scripted=SC))
    try:
        addr = p.kv_listen("decode-1")
        t = threading.Thread(target=d.kv_connect, args=("prefill-1", addr, False))
        t.start()
        p.kv_connect("decode-1", addr, True)
        t.join()
        prompt = list(range(60, 80))
        # The prefill side's chunks go to a decode side that was never told (dropped there);
        # the decode side stages a handoff whose prefill never starts.
        p.submit_prefill(HandoffSpec(1, "x#1", "prefill-1", "decode-1", tuple(prompt), GREEDY))
        d.begin_import(HandoffSpec(2, "y#1", "prefill-1", "decode-1", tuple(prompt), GREEDY))
        _, events = drain((p, d), 0.2)
        assert events == [] and p.stats().pinned == 1 and d.stats().imports == 1
        _, events = drain((p, d), 2.0, lambda _, ev: len(ev) == 2)
        assert sorted((n, e.handoff_id, e.kind) for n, e in events) == [
            ("decode-1", 2, "failed"),
            ("prefill-1", 1, "failed"),
        ]
        assert all("lease backstop" in e.detail for _, e in events)
        idle(p, d)
    finally:
        p.shutdown()
        d.shutdown()


def test_failed_export_frees_its_blocks_without_the_cluster() -> None:
    """A send that fails ends the prefill-side request at once: nothing pinned, nothing untracked.

    The cluster may ignore the "failed" event (its handoff already ended); the worker must not
    keep a prefilled request that no export tracks, since no backstop would ever free it.
    """
    kv = KVTransferConfig(send_timeout_s=5, connect_timeout_s=20)
    p = Worker(WorkerSpec("prefill-2", "prefill", "prefill", "scripted", kv=kv, scripted=SC))
    try:
        prompt = list(range(30, 50))
        # No channel to decode-9 was ever opened: the first layer's send fails.
        p.submit_prefill(HandoffSpec(7, "z#1", "prefill-2", "decode-9", tuple(prompt), GREEDY))
        _, events = drain((p,), 5.0, lambda _, ev: bool(ev))
        assert [(e.handoff_id, e.kind) for _, e in events] == [(7, "failed")]
        idle(p)
    finally:
        p.shutdown()


def test_ack_before_the_prefill_pinned_still_frees_it(pair: tuple[Worker, Worker]) -> None:
    """A release that overtakes the prefill (a stray or early ack) ends the request here."""
    p, d = pair
    p.submit_prefill(HandoffSpec(8, "w#1", "prefill-0", "decode-0", tuple(range(40, 70)), GREEDY))
    p.release("w#1")  # runs after the submit, before the prompt's last chunk pins it
    drain((p, d), 0.5)
    idle(p, d)

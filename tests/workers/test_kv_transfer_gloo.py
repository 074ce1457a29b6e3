"""torch.distributed KV transport between two real processes (gloo on 127.0.0.1)."""

from __future__ import annotations

import os
import queue
import time
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from batonserve.workers.kv_transfer import (
    FINAL_LAYER,
    KVChunk,
    KVSpec,
    KVTransferConfig,
    KVTransferError,
    make_transport,
)

SPEC = KVSpec("m", "float32", 3, 2, 4, 4)
CFG = KVTransferConfig(send_timeout_s=5.0, connect_timeout_s=20.0)


def _kv(handoff: int, layer: int, start: int, n: int) -> torch.Tensor:
    """Deterministic [2, n, heads, dim] payload so the receiver can check every value."""
    base = torch.arange(2 * n * 2 * 4, dtype=torch.float32).view(2, n, 2, 4)
    return base + 1000 * handoff + 100 * layer + start


def _transport(name: str, got: Any, errors: Any) -> Any:
    return make_transport(
        "torch_dist",
        name,
        SPEC,
        CFG,
        lambda peer, c: got.append((peer, c)),
        lambda peer, e: errors.put(f"{peer}: {e}"),
        host="127.0.0.1",
    )


def _sender(addr_q: Any, go_q: Any, die_early: bool) -> None:
    torch.set_num_threads(1)
    t = _transport("prefill-0", [], queue.Queue())
    addr_q.put(t.listen("decode-0"))
    t.connect("decode-0", go_q.get(), True)
    # Two handoffs interleaved layer by layer, in two prompt chunks each: the receiver must
    # sort them out by header alone.
    for start, n in ((0, 5), (5, 3)):
        for layer in range(SPEC.num_layers):
            for hid in (1, 2):
                t.send("decode-0", KVChunk(hid, layer, start, _kv(hid, layer, start, n)))
        if die_early:
            time.sleep(1.0)
            os._exit(0)  # a peer that dies mid-handoff
    for hid in (1, 2):
        t.send("decode-0", KVChunk(hid, FINAL_LAYER, 8, None, 40 + hid))
    time.sleep(1.5)  # let the receiver drain before the process group goes away
    t.close()


def _receiver(addr_q: Any, go_q: Any, out_q: Any) -> None:
    torch.set_num_threads(1)
    got: list[tuple[str, KVChunk]] = []
    errors: queue.Queue[str] = queue.Queue()
    t = _transport("decode-0", got, errors)
    addr = addr_q.get()
    go_q.put(addr)
    t.connect("prefill-0", addr, False)
    deadline = time.monotonic() + 20
    while len(got) < 2 * 2 * SPEC.num_layers + 2 and errors.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        err = errors.get(timeout=8) if len(got) < 14 else ""
    except queue.Empty:
        err = ""
    # Plain lists: tensors through a multiprocessing queue would outlive this process's memory.
    rows = [
        (p, c.handoff_id, c.layer, c.start, None if c.kv is None else c.kv.tolist(), c.first_token)
        for p, c in got
    ]
    out_q.put((rows, err))
    t.close()


def _run(die_early: bool) -> tuple[list[Any], str]:
    ctx = mp.get_context("spawn")
    addr_q, go_q, out_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(target=_sender, args=(addr_q, go_q, die_early)),
        ctx.Process(target=_receiver, args=(addr_q, go_q, out_q)),
    ]
    for p in procs:
        p.start()
    try:
        return out_q.get(timeout=60)  # type: ignore[no-any-return]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def test_interleaved_handoffs_arrive_intact_and_in_order() -> None:
    got, err = _run(die_early=False)
    assert err == ""
    assert len(got) == 2 * 2 * SPEC.num_layers + 2
    assert all(peer == "prefill-0" for peer, *_ in got)
    for hid in (1, 2):
        mine = [g for g in got if g[1] == hid]
        kv_chunks = [
            (layer, start, kv) for _, _, layer, start, kv, _ in mine if layer != FINAL_LAYER
        ]
        assert [(layer, start) for layer, start, _ in kv_chunks] == [
            (layer, start) for start in (0, 5) for layer in range(SPEC.num_layers)
        ]
        for layer, start, kv in kv_chunks:
            n = 5 if start == 0 else 3
            torch.testing.assert_close(torch.tensor(kv), _kv(hid, layer, start, n), rtol=0, atol=0)
        assert mine[-1][2] == FINAL_LAYER and mine[-1][5] == 40 + hid


def test_peer_death_is_a_clear_error() -> None:
    got, err = _run(die_early=True)
    assert len(got) == 2 * SPEC.num_layers  # the first chunk of each layer arrived
    assert "KV channel prefill-0 -> decode-0 failed" in err


def test_no_channel_and_no_self_send() -> None:
    t = _transport("prefill-0", [], queue.Queue())
    try:
        with pytest.raises(KVTransferError, match="no KV channel to decode-0"):
            t.send("decode-0", KVChunk(1, 0, 0, torch.zeros(2, 1, 2, 4)))
        with pytest.raises(KVTransferError, match="never sends KV to itself"):
            t.listen("prefill-0")
    finally:
        t.close()


def test_unknown_transport_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"kv_transfer\.transport"):
        make_transport("carrier_pigeon", "a", SPEC, CFG, lambda p, c: None, lambda p, e: None)


def test_compatibility_check_names_the_field() -> None:
    SPEC.check_compatible(KVSpec("m", "float32", 3, 2, 4, 4))
    with pytest.raises(KVTransferError, match="num_kv_heads 2 != 8"):
        SPEC.check_compatible(KVSpec("m", "float32", 3, 8, 4, 4))
    with pytest.raises(KVTransferError, match="dtype"):
        SPEC.check_compatible(KVSpec("m", "bfloat16", 3, 2, 4, 4))


def test_connect_after_the_peer_was_closed_is_a_transfer_error() -> None:
    # The cluster closes every channel with a worker that died; a launch already between its
    # listen and its connect then gets a clear KVTransferError (it was a bare KeyError).
    t = _transport("prefill-0", [], queue.Queue())
    try:
        addr = t.listen("decode-0")
        t.close_peer("decode-0")
        with pytest.raises(KVTransferError, match="no rendezvous open with decode-0"):
            t.connect("decode-0", addr, sender=True)
    finally:
        t.close()

"""A cancelled stream or an expired deadline aborts the request and frees its KV blocks."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from testkit.router_harness import RouterHarness, fakes, reply_script

from batonserve.proto import generation_pb2 as pb
from batonserve.workers.tokenizer import Tokenizer


@pytest.fixture
def slow(make_router: Callable[..., RouterHarness], tokenizer: Tokenizer) -> RouterHarness:
    """A fake emitting a token every 50 ms, with a long script."""
    return make_router(
        fake_config=fakes.FakeClusterConfig(token_interval_s=0.05),
        script=reply_script(tokenizer, repeat=4),
    )


def test_cancel_aborts_and_frees_blocks(slow: RouterHarness) -> None:
    req = pb.GenerateRequest(request_id="c1", text="Hi", sampling=pb.SamplingParams(max_tokens=50))
    stream = slow.stub().Generate(req, timeout=20)
    for _ in range(3):
        next(stream)
    assert slow.cluster.used_blocks > 0  # the request holds blocks while it runs
    stream.cancel()
    slow.wait_for(lambda: slow.cluster.aborted == ["c1"] and slow.cluster.used_blocks == 0)
    assert slow.server.dispatcher.inflight == 0
    assert slow.cluster.running == {}


def test_deadline_aborts_and_frees_blocks(slow: RouterHarness) -> None:
    req = pb.GenerateRequest(request_id="d1", text="Hi", sampling=pb.SamplingParams(max_tokens=50))
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for msg in slow.stub().Generate(req, timeout=0.4):
            got.append(msg)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < len(got) < 50
    slow.wait_for(lambda: slow.cluster.aborted == ["d1"] and slow.cluster.used_blocks == 0)
    assert slow.server.dispatcher.inflight == 0


def test_finished_request_is_not_aborted(router: RouterHarness) -> None:
    req = pb.GenerateRequest(request_id="f1", text="Hi", sampling=pb.SamplingParams(max_tokens=3))
    assert len(list(router.stub().Generate(req, timeout=5))) == 3
    assert router.cluster.aborted == [] and router.cluster.used_blocks == 0

"""Every status code the router promises, each provoked over a real socket."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

import grpc
import pytest
from testkit.router_harness import CONTEXT_LENGTH, RouterHarness, fakes, reply_script

from batonserve.cluster.config import RouterConfig
from batonserve.proto import generation_pb2 as pb
from batonserve.workers.tokenizer import Tokenizer

S = pb.SamplingParams


def _status(call: Callable[[], Iterable[object]]) -> grpc.RpcError:
    """The error that ends a streaming call (the stream is read to its end)."""
    with pytest.raises(grpc.RpcError) as info:
        list(call())
    return info.value


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.GenerateRequest(text=""), "text"),
        (pb.GenerateRequest(), "input"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 99999])), "token_ids.ids[2]"),
        (pb.GenerateRequest(text="Hi", sampling=S(temperature=math.nan)), "sampling.temperature"),
        (pb.GenerateRequest(text="Hi", sampling=S(temperature=-1)), "sampling.temperature"),
        (pb.GenerateRequest(text="Hi", sampling=S(top_p=0)), "sampling.top_p"),
        (pb.GenerateRequest(text="Hi", sampling=S(top_k=-2)), "sampling.top_k"),
        (pb.GenerateRequest(text="Hi", sampling=S(max_tokens=0)), "sampling.max_tokens"),
        (pb.GenerateRequest(text="Hi", sampling=S(max_tokens=500)), "sampling.max_tokens"),
        (pb.GenerateRequest(text="Hi", sampling=S(stop=["ok", ""])), "sampling.stop[1]"),
        (
            pb.GenerateRequest(text="Hi", sampling=S(stop_token_ids=[70000])),
            "sampling.stop_token_ids[0]",
        ),
        (pb.GenerateRequest(text="word " * CONTEXT_LENGTH), "text"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3] * CONTEXT_LENGTH)), "token_ids"),
    ],
)
def test_invalid_argument_names_the_field(
    router: RouterHarness, request_: pb.GenerateRequest, field: str
) -> None:
    err = _status(lambda: router.stub().Generate(request_, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}:"), err.details()
    assert router.cluster.requests == []  # nothing reached the cluster


def test_invalid_utf8_is_invalid_argument(router: RouterHarness) -> None:
    # A hand-built GenerateRequest: field 3 (text), length 2, bytes that are not UTF-8.
    raw = b"\x1a\x02\xff\xfe"
    call = router.channel().unary_stream(
        "/batonserve.v1.Generation/Generate",
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    err = _status(lambda: call(raw, timeout=5))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.details()


def test_unknown_model_is_not_found(router: RouterHarness) -> None:
    err = _status(lambda: router.stub().Generate(pb.GenerateRequest(model="gpt", text="Hi")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "'gpt'" in err.details() and "'tiny'" in err.details()


def test_admission_rejected_is_resource_exhausted(
    make_router: Callable[..., RouterHarness],
) -> None:
    # 4 blocks of 4 tokens: a 3-token prompt plus 30 new tokens needs 9.
    h = make_router(fake_config=fakes.FakeClusterConfig(num_blocks=4))
    err = _status(
        lambda: h.stub().Generate(pb.GenerateRequest(text="Hi", sampling=S(max_tokens=30)))
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV blocks" in err.details()
    assert h.cluster.rejected == 1 and h.cluster.used_blocks == 0


def test_running_slots_full_is_resource_exhausted(
    make_router: Callable[..., RouterHarness], tokenizer: Tokenizer
) -> None:
    h = make_router(
        fake_config=fakes.FakeClusterConfig(max_running=1, token_interval_s=0.05),
        script=reply_script(tokenizer, repeat=4),
    )
    first = h.stub().Generate(pb.GenerateRequest(text="Hi", sampling=S(max_tokens=40)), timeout=10)
    next(first)  # admitted and streaming
    err = _status(lambda: h.stub().Generate(pb.GenerateRequest(text="Ho"), timeout=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    first.cancel()


def test_unhealthy_cluster_is_unavailable(make_router: Callable[..., RouterHarness]) -> None:
    h = make_router(fake_config=fakes.FakeClusterConfig(ready=False))
    err = _status(lambda: h.stub().Generate(pb.GenerateRequest(text="Hi"), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy" in err.details()


def test_draining_is_unavailable(router: RouterHarness) -> None:
    router.loop.run(router.server.drain(0.1))
    err = _status(lambda: router.stub().Generate(pb.GenerateRequest(text="Hi"), timeout=5))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.details()


def test_bug_is_internal_without_traceback(
    make_router: Callable[..., RouterHarness], caplog: pytest.LogCaptureFixture
) -> None:
    h = make_router(fake_config=fakes.FakeClusterConfig(fail_after_tokens=2))
    stream = h.stub().Generate(pb.GenerateRequest(text="Hi", sampling=S(max_tokens=10)), timeout=5)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for msg in stream:
            got.append(msg)
    assert len(got) == 2  # tokens before the failure were delivered
    err = info.value
    assert err.code() == grpc.StatusCode.INTERNAL
    assert err.details().startswith("internal error (incident ")
    assert "secret" not in err.details() and "Traceback" not in err.details()
    # The server logged the traceback instead, under the same incident id.
    incident = err.details().split()[-1].rstrip(")")
    assert any(incident in r.getMessage() and r.exc_info for r in caplog.records)
    h.wait_for(lambda: h.cluster.used_blocks == 0)


def test_duplicate_request_id_is_already_exists(
    make_router: Callable[..., RouterHarness], tokenizer: Tokenizer
) -> None:
    h = make_router(
        fake_config=fakes.FakeClusterConfig(token_interval_s=0.05),
        script=reply_script(tokenizer, repeat=4),
    )
    req = pb.GenerateRequest(request_id="dup", text="Hi", sampling=S(max_tokens=40))
    first = h.stub().Generate(req, timeout=10)
    next(first)
    err = _status(lambda: h.stub().Generate(req, timeout=5))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


def test_message_size_limit(make_router: Callable[..., RouterHarness]) -> None:

    h = make_router(router_config=RouterConfig(max_message_bytes=1024))
    err = _status(lambda: h.stub().Generate(pb.GenerateRequest(text="x" * 2000), timeout=5))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert h.cluster.requests == []


def test_unserved_rpc_is_unimplemented(router: RouterHarness) -> None:
    # Triton's ModelConfig is part of its service, but not something batonserve serves.
    call = router.channel().unary_unary(
        "/inference.GRPCInferenceService/ModelConfig",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as info:
        call(b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_concurrent_streams_are_independent(router: RouterHarness) -> None:
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        req = pb.GenerateRequest(text=f"prompt {i}", sampling=S(max_tokens=10))
        results[i] = [t for m in router.stub().Generate(req, timeout=10) for t in m.token_ids]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(results) == 6 and all(len(v) == 10 for v in results.values())
    assert router.cluster.used_blocks == 0

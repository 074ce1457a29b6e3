"""Hostile input over a real socket: malformed and extreme requests on both protocols.

Every request gets a proper status (never INTERNAL or UNKNOWN, and the server never goes away),
nothing leaks in the cluster, and a valid request afterwards is served correctly.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testkit.router_harness import CONTEXT_LENGTH, REPLY, RouterHarness

from batonserve.cluster.api import ModelInfo
from batonserve.cluster.config import RouterConfig
from batonserve.proto import generation_pb2 as gpb
from batonserve.proto import kserve_v2_pb2 as kpb
from batonserve.workers.tokenizer import Tokenizer

MAX_MESSAGE = 64 * 1024  # small, so oversize messages are cheap to build
# Proper answers to hostile input; INTERNAL/UNKNOWN (a bug) and UNAVAILABLE (a dead server)
# are not among them.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
}
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
GENERATE = "/batonserve.v1.Generation/Generate"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def server(tokenizer: Tokenizer, model_info: ModelInfo) -> Iterator[RouterHarness]:
    """One router for the whole module (hypothesis runs many examples against it), checked healthy
    once the module's tests are done, whichever of them ran and in whatever order."""
    h = RouterHarness(
        tokenizer, model_info, router_config=RouterConfig(max_message_bytes=MAX_MESSAGE)
    )
    yield h
    try:
        _assert_healthy(h, tokenizer)
    finally:
        h.close()


def _identity(b: bytes) -> bytes:
    return b


def _raw_generate(h: RouterHarness, data: bytes) -> grpc.StatusCode:
    call = h.channel().unary_stream(
        GENERATE,
        request_serializer=_identity,
        response_deserializer=gpb.GenerateResponse.FromString,
    )
    try:
        for _ in call(data, timeout=10):
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _raw_infer(h: RouterHarness, data: bytes) -> grpc.StatusCode:
    call = h.channel().unary_unary(
        MODEL_INFER,
        request_serializer=_identity,
        response_deserializer=kpb.ModelInferResponse.FromString,
    )
    try:
        call(data, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _raw_stream_infer(h: RouterHarness, items: list[bytes]) -> list[grpc.StatusCode]:
    """Codes of each in-band answer (error_message 'CODE: ...') and of the call itself."""
    call = h.channel().stream_stream(
        STREAM_INFER,
        request_serializer=_identity,
        response_deserializer=kpb.ModelStreamInferResponse.FromString,
    )
    codes = []
    try:
        for resp in call(iter(items), timeout=10):
            if resp.error_message:
                codes.append(grpc.StatusCode[resp.error_message.split(":", 1)[0]])
    except grpc.RpcError as e:
        codes.append(e.code())
    return codes


def _assert_healthy(h: RouterHarness, tokenizer: Tokenizer) -> None:
    """The server is up, nothing leaked, and a valid request gets the exact scripted reply."""
    h.wait_for(lambda: h.cluster.used_blocks == 0 and not h.cluster.running)
    req = gpb.GenerateRequest(text="Hi", sampling=gpb.SamplingParams(max_tokens=5))
    got = [t for m in h.stub().Generate(req, timeout=10) for t in m.token_ids]
    assert got == tokenizer.encode(REPLY, add_special_tokens=False)[:5]


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --- native batonserve.v1 ---------------------------------------------------------------------
ints = st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1), st.just(2**32 - 1))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.just(math.nan))
sampling = st.builds(
    gpb.SamplingParams,
    max_tokens=st.none() | ints,
    temperature=st.none() | floats,
    top_p=st.none() | floats,
    top_k=st.none() | st.integers(-(2**31), 2**31 - 1),
    seed=st.none() | st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(max_size=5), max_size=3),
    stop_token_ids=st.lists(ints, max_size=3),
    ignore_eos=st.none() | st.booleans(),
)
prompt = st.one_of(
    st.builds(lambda t: {"text": t}, st.text(max_size=40)),  # includes empty and odd code points
    st.builds(lambda n: {"text": "word " * n}, st.integers(0, 10_000)),  # up to enormous
    st.builds(lambda ids: {"token_ids": gpb.TokenIds(ids=ids)}, st.lists(ints, max_size=80)),
    st.just({}),
)


@FUZZ
@given(prompt=prompt, sampling=sampling, model=st.sampled_from(["", "tiny", "other"]))
def test_native_structured(
    server: RouterHarness, prompt: dict, sampling: gpb.SamplingParams, model: str
) -> None:
    msg = gpb.GenerateRequest(model=model, sampling=sampling, **prompt)
    code = _raw_generate(server, msg.SerializeToString())
    assert code in ALLOWED, code


valid_native = gpb.GenerateRequest(text="Hi", sampling=gpb.SamplingParams(max_tokens=3))


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=200),  # garbage
        st.builds(  # a valid message cut short
            lambda cut: valid_native.SerializeToString()[:cut], st.integers(0, 12)
        ),
        st.builds(  # a string field holding bytes that are not UTF-8
            lambda field, junk: bytes([field << 3 | 2, len(junk)]) + junk,
            st.sampled_from([1, 2, 3]),
            st.binary(min_size=1, max_size=20).filter(lambda b: not _utf8(b)),
        ),
    )
)
def test_native_raw_bytes(server: RouterHarness, data: bytes) -> None:
    assert _raw_generate(server, data) in ALLOWED


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(
    fields=st.lists(
        st.tuples(st.integers(9, 2**29 - 1), st.sampled_from([0, 1, 2, 5]), st.binary(max_size=8)),
        min_size=1,
        max_size=4,
    )
)
def test_unknown_fields_are_ignored(server: RouterHarness, fields: list) -> None:
    # proto3 skips unknown fields: the request must be served as if they were absent.
    data = valid_native.SerializeToString()
    for number, wire, payload in fields:
        key = _varint(number << 3 | wire)
        if wire == 0:
            data += key + _varint(int.from_bytes(payload or b"\0", "little"))
        elif wire == 1:
            data += key + payload.ljust(8, b"\0")[:8]
        elif wire == 5:
            data += key + payload.ljust(4, b"\0")[:4]
        else:
            data += key + _varint(len(payload)) + payload
    assert _raw_generate(server, data) == grpc.StatusCode.OK


# --- KServe v2 ---------------------------------------------------------------------------------
DTYPES = ["BYTES", "INT32", "INT64", "UINT64", "FP32", "FP64", "BOOL", "FP16", "STRING", ""]
NAMES = [
    "text_input",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "ignore_eos",
    "stream",
    "exclude_input_in_output",
    "bogus",
]


@st.composite
def infer_tensor(draw: st.DrawFn) -> tuple[kpb.ModelInferRequest.InferInputTensor, bytes | None]:
    t = kpb.ModelInferRequest.InferInputTensor(
        name=draw(st.sampled_from(NAMES)),
        datatype=draw(st.sampled_from(DTYPES)),
        shape=draw(st.lists(st.integers(-2, 2**40), max_size=3)),
    )
    c = t.contents
    kind = draw(st.integers(0, 6))
    if kind == 0:
        c.bytes_contents.extend(draw(st.lists(st.binary(max_size=30), max_size=3)))
    elif kind == 1:
        c.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=3)))
    elif kind == 2:
        c.int64_contents.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
    elif kind == 3:
        c.uint64_contents.extend(draw(st.lists(st.integers(0, 2**64 - 1), max_size=3)))
    elif kind == 4:
        c.fp32_contents.extend(draw(st.lists(floats, max_size=3)))
    elif kind == 5:
        c.bool_contents.extend(draw(st.lists(st.booleans(), max_size=3)))
    raw = draw(
        st.none()
        | st.binary(max_size=24)
        | st.builds(lambda s: struct.pack("<I", len(s)) + s, st.binary(max_size=20))
    )
    return t, raw


param_value = st.one_of(
    st.builds(lambda v: kpb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: kpb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: kpb.InferParameter(string_param=v), st.text(max_size=8)),
    st.builds(lambda v: kpb.InferParameter(double_param=v), st.floats()),
    st.builds(lambda v: kpb.InferParameter(uint64_param=v), st.integers(0, 2**64 - 1)),
    st.just(kpb.InferParameter()),
)


@st.composite
def infer_request(draw: st.DrawFn) -> kpb.ModelInferRequest:
    msg = kpb.ModelInferRequest(
        model_name=draw(st.sampled_from(["tiny", "", "other"])),
        id=draw(st.text(max_size=8)),
    )
    with_raw = draw(st.booleans())
    for t, raw in draw(st.lists(infer_tensor(), max_size=4)):
        msg.inputs.append(t)
        if with_raw:
            msg.raw_input_contents.append(raw or b"")
    for key, value in draw(
        st.dictionaries(
            st.sampled_from([*NAMES, "triton_enable_empty_final_response"]), param_value, max_size=3
        )
    ).items():
        msg.parameters[key].CopyFrom(value)
    for name in draw(st.lists(st.sampled_from(["text_output", "finish_reason", "x"]), max_size=2)):
        msg.outputs.add(name=name)
    return msg


@FUZZ
@given(msg=infer_request())
def test_kserve_structured(server: RouterHarness, msg: kpb.ModelInferRequest) -> None:
    data = msg.SerializeToString()
    assert _raw_infer(server, data) in ALLOWED
    assert set(_raw_stream_infer(server, [data])) <= ALLOWED


def _text_request(text: bytes, **params: int) -> kpb.ModelInferRequest:
    t = kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(text)
    msg = kpb.ModelInferRequest(model_name="tiny", inputs=[t])
    for k, v in params.items():
        msg.parameters[k].int64_param = v
    return msg


valid_infer = _text_request(b"Hi", max_tokens=3)


@FUZZ
@given(
    items=st.lists(
        st.one_of(
            st.binary(max_size=100),
            st.builds(lambda cut: valid_infer.SerializeToString()[:cut], st.integers(0, 40)),
            st.builds(lambda b: _text_request(b).SerializeToString(), st.binary(max_size=20)),
            st.just(valid_infer.SerializeToString()),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_kserve_raw_bytes(server: RouterHarness, items: list[bytes]) -> None:
    for data in items:
        assert _raw_infer(server, data) in ALLOWED
    assert set(_raw_stream_infer(server, items)) <= ALLOWED


# --- the limits, one by one -------------------------------------------------------------------
def test_extremes_and_recovery(server: RouterHarness, tokenizer: Tokenizer) -> None:
    S = gpb.SamplingParams
    cases: list[tuple[bytes, grpc.StatusCode]] = [
        # huge max_tokens
        (
            gpb.GenerateRequest(text="Hi", sampling=S(max_tokens=2**32 - 1)).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # NaN, infinite and negative sampling values
        (
            gpb.GenerateRequest(text="Hi", sampling=S(top_p=math.nan)).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            gpb.GenerateRequest(text="Hi", sampling=S(temperature=math.inf)).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            gpb.GenerateRequest(text="Hi", sampling=S(top_k=-(2**31))).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # empty and enormous prompts (under, then over, the message limit)
        (gpb.GenerateRequest(text="").SerializeToString(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            gpb.GenerateRequest(text="word " * (MAX_MESSAGE // 6)).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            gpb.GenerateRequest(
                token_ids=gpb.TokenIds(ids=[5] * (MAX_MESSAGE // 2))
            ).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,  # fits the message limit, not the context
        ),
        (
            gpb.GenerateRequest(token_ids=gpb.TokenIds(ids=[5] * MAX_MESSAGE)).SerializeToString(),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            gpb.GenerateRequest(text="x" * (MAX_MESSAGE + 1)).SerializeToString(),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (b"\x0a\xff\xff\xff\xff\x0f", grpc.StatusCode.INVALID_ARGUMENT),  # length past the end
    ]
    for data, want in cases:
        assert _raw_generate(server, data) == want
    kcases: list[tuple[kpb.ModelInferRequest, grpc.StatusCode]] = [
        (_text_request(b"\xff\xfeHi"), grpc.StatusCode.INVALID_ARGUMENT),
        (_text_request(b"Hi", max_tokens=2**62), grpc.StatusCode.INVALID_ARGUMENT),
        (_text_request(b"Hi", max_tokens=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (_text_request(b"Hi", seed=-5), grpc.StatusCode.INVALID_ARGUMENT),
        (_text_request(b""), grpc.StatusCode.INVALID_ARGUMENT),
        (_text_request(b"w " * (MAX_MESSAGE // 3)), grpc.StatusCode.INVALID_ARGUMENT),
        (_text_request(b"w" * (MAX_MESSAGE + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]
    for msg, want in kcases:
        assert _raw_infer(server, msg.SerializeToString()) == want, msg.parameters
    # In a stream an oversize message ends the call itself (grpc refuses to read it).
    codes = _raw_stream_infer(server, [_text_request(b"w" * (MAX_MESSAGE + 1)).SerializeToString()])
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    _assert_healthy(server, tokenizer)
    assert CONTEXT_LENGTH < MAX_MESSAGE


def test_enormous_text_is_refused_before_tokenizing(
    make_router: Callable[..., RouterHarness],
    tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nearly 4 MiB of text (the default message limit) took seconds to tokenize, on the event
    # loop, stalling every other stream; text that cannot fit the context whatever its tokens
    # are must be refused at once, on both protocols. Checked by what reaches the tokenizer, not
    # by a time (the refusal's latency is a benchmark's figure, not a unit test's).
    encode, longest = Tokenizer.encode, [0]

    def recording(self: Tokenizer, text: str, *args: object, **kw: object) -> list[int]:
        longest[0] = max(longest[0], len(text))
        return encode(self, text, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Tokenizer, "encode", recording)
    h = make_router()
    text = "word " * (800_000)
    for name, send in (
        ("text", lambda: _raw_generate(h, gpb.GenerateRequest(text=text).SerializeToString())),
        ("text_input", lambda: _raw_infer(h, _text_request(text.encode()).SerializeToString())),
    ):
        assert send() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert longest[0] < len(text), name  # refused before the tokenizer saw it
    info = h.stub().GetModelInfo(gpb.GetModelInfoRequest(), timeout=5)
    assert info.context_length == CONTEXT_LENGTH
    _assert_healthy(h, tokenizer)

"""KServe v2 / Triton: an unmodified tritonclient (own virtualenv) and hand-built requests."""

from __future__ import annotations

import json
import queue
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from testkit.router_harness import REPLY, RouterHarness, fakes, reply_script

from batonserve.proto import kserve_v2_pb2 as pb
from batonserve.proto import kserve_v2_pb2_grpc
from batonserve.workers.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[3]
TRITON_PYTHON = ROOT / ".tools" / "triton-venv" / "bin" / "python"


def _text(tokenizer: Tokenizer, n: int) -> str:
    return tokenizer.decode(tokenizer.encode(REPLY, add_special_tokens=False)[:n])


def test_tritonclient(router: RouterHarness, tokenizer: Tokenizer) -> None:
    assert TRITON_PYTHON.exists(), "run tests/install-tools.sh (installs tritonclient's venv)"
    proc = subprocess.run(
        [
            str(TRITON_PYTHON),
            str(Path(__file__).parent / "triton_client_check.py"),
            router.target,
            "tiny",
            "Hello there",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert not got["other_model_ready"]
    assert got["server_name"] == "batonserve"
    assert got["inputs"][0] == "text_input"
    assert got["metadata_unknown"] == "StatusCode.NOT_FOUND"
    assert got["config_unimplemented"] == "StatusCode.UNIMPLEMENTED"
    assert got["infer_text"] == _text(tokenizer, 12)
    assert got["infer_finish"] == "length" and got["infer_id"] == "unary-1"
    pieces = got["stream_pieces"]
    assert "".join(pieces) == _text(tokenizer, 8)
    assert len(pieces) == 8  # one response per token, then an empty final one:
    assert got["stream_finals"] == [False] * 8 + [True]
    assert got["stream_error"].startswith("INVALID_ARGUMENT: text_input")
    sent = router.cluster.requests
    assert [r.sampling.max_tokens for r in sent] == [12, 8]
    assert sent[1].sampling.temperature == 0.0
    assert router.cluster.used_blocks == 0


def _bytes_input(name: str, value: bytes) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(
        name=name,
        datatype="BYTES",
        shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[value]),
    )


def _infer(h: RouterHarness, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    return kserve_v2_pb2_grpc.GRPCInferenceServiceStub(h.channel()).ModelInfer(req, timeout=10)


def _raw_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def test_typed_contents_and_parameters(router: RouterHarness, tokenizer: Tokenizer) -> None:
    req = pb.ModelInferRequest(
        model_name="tiny", id="c-1", inputs=[_bytes_input("text_input", b"Hi")]
    )
    req.inputs.add(name="max_tokens", datatype="INT64", shape=[1]).contents.int64_contents.append(4)
    req.parameters["seed"].int64_param = 9
    req.parameters["temperature"].double_param = 0.5
    req.outputs.add(name="text_output")  # only what is asked for comes back
    resp = _infer(router, req)
    assert [o.name for o in resp.outputs] == ["text_output"]
    (text,) = [b[4:] for b in resp.raw_output_contents]
    assert text.decode() == _text(tokenizer, 4)
    sp = router.cluster.requests[-1].sampling
    assert (sp.max_tokens, sp.seed, sp.temperature) == (4, 9, 0.5)


def test_raw_inputs(router: RouterHarness) -> None:
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    req.inputs.add(name="max_tokens", datatype="UINT32", shape=[1])
    req.raw_input_contents.extend([_raw_bytes([b"Hi"]), struct.pack("<I", 3)])
    resp = _infer(router, req)
    assert router.cluster.requests[-1].sampling.max_tokens == 3
    assert resp.outputs[1].name == "finish_reason" and resp.raw_output_contents[1][4:] == b"length"


@pytest.mark.parametrize(
    ("mutate", "code", "start"),
    [
        (lambda r: r.inputs.pop(), grpc.StatusCode.INVALID_ARGUMENT, "text_input: missing"),
        (
            lambda r: r.inputs[0].contents.bytes_contents.__setitem__(0, b"\xff\xfe"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "text_input: not valid UTF-8",
        ),
        (
            lambda r: r.inputs[0].contents.bytes_contents.append(b"two"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "text_input: expected exactly one element",
        ),
        (
            lambda r: r.inputs.append(_bytes_input("prompt", b"x")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs: unknown input 'prompt'",
        ),
        (
            lambda r: r.parameters["max_tokens"].CopyFrom(pb.InferParameter(double_param=2.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens: expected an integer",
        ),
        (
            lambda r: r.parameters["temperature"].CopyFrom(pb.InferParameter(string_param="hot")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature: expected a number",
        ),
        (
            lambda r: r.outputs.add(name="logits"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outputs: unknown output 'logits'",
        ),
        (lambda r: setattr(r, "model_name", "other"), grpc.StatusCode.NOT_FOUND, "model_name:"),
    ],
)
def test_infer_errors(
    router: RouterHarness,
    mutate: Callable[[pb.ModelInferRequest], object],
    code: grpc.StatusCode,
    start: str,
) -> None:
    req = pb.ModelInferRequest(model_name="tiny", inputs=[_bytes_input("text_input", b"Hi")])
    mutate(req)
    with pytest.raises(grpc.RpcError) as info:
        _infer(router, req)
    assert info.value.code() == code
    assert info.value.details().startswith(start), info.value.details()


def test_stream_errors_in_band_and_cancel_aborts(
    make_router: Callable[..., RouterHarness], tokenizer: Tokenizer
) -> None:
    h = make_router(
        fake_config=fakes.FakeClusterConfig(token_interval_s=0.05, max_running=1),
        script=reply_script(tokenizer, repeat=4),
    )
    stub = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(h.channel())

    def request(rid: str) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(
            model_name="tiny", id=rid, inputs=[_bytes_input("text_input", b"Hi")]
        )
        r.parameters["stream"].bool_param = True
        r.parameters["max_tokens"].int64_param = 50
        return r

    outgoing: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    outgoing.put(request("s-1"))
    call = stub.ModelStreamInfer(iter(outgoing.get, None), timeout=20)
    first = next(call)
    assert first.infer_response.id == "s-1" and not first.error_message
    outgoing.put(request("s-2"))  # one running slot only: refused, in-band
    while True:
        msg = next(call)
        if msg.error_message:
            break
    assert msg.infer_response.id == "s-2"
    assert msg.error_message.startswith("RESOURCE_EXHAUSTED: admission refused")
    call.cancel()  # the client hangs up mid-stream: s-1 is aborted and its blocks freed
    h.wait_for(lambda: len(h.cluster.aborted) == 1 and h.cluster.used_blocks == 0)
    assert h.cluster.aborted[0].startswith("s-1-")

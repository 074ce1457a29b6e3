"""The KServe v2 `inference.GRPCInferenceService` (with Triton's ModelStreamInfer) for text generation.

Inputs: BYTES `text_input` (one element) and optional scalars `max_tokens`, `temperature`,
`top_p`, `top_k`, `seed`, `ignore_eos`, `stream`, given as input tensors or request parameters
(a tensor wins). Outputs: BYTES `text_output` and, on the last response, `finish_reason`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from batonserve.cluster.api import GenerateRequest, ModelInfo
from batonserve.cluster.router.dispatch import Dispatcher
from batonserve.cluster.router.errors import abort_with, invalid, to_request_error
from batonserve.cluster.router.handlers import Malformed
from batonserve.cluster.router.kserve_io import (
    Scalar,
    bytes_output,
    parameter_value,
    single_element,
)
from batonserve.cluster.router.validation import (
    SamplingValues,
    build_request,
    check_model,
    encode_prompt,
)
from batonserve.proto import kserve_v2_pb2 as pb
from batonserve.workers.tokenizer import Tokenizer

SERVICE_NAME = "inference.GRPCInferenceService"
MODEL_VERSION = "1"
_INT_FIELDS = ("max_tokens", "top_k", "seed")
_FLOAT_FIELDS = ("temperature", "top_p")
_BOOL_FIELDS = ("stream", "ignore_eos")
_INPUTS = ("text_input", *_INT_FIELDS, *_FLOAT_FIELDS, *_BOOL_FIELDS)
# Accepted for compatibility with Triton's vLLM backend; we never echo the prompt anyway.
_IGNORED_INPUTS = ("exclude_input_in_output",)
_OUTPUTS = ("text_output", "finish_reason")
_INPUT_METADATA = (
    ("text_input", "BYTES"),
    ("max_tokens", "INT32"),
    ("temperature", "FP32"),
    ("top_p", "FP32"),
    ("top_k", "INT32"),
    ("seed", "UINT64"),
    ("ignore_eos", "BOOL"),
    ("stream", "BOOL"),
)


@dataclass(frozen=True)
class InferCall:
    """One parsed ModelInferRequest."""

    request: GenerateRequest
    stream: bool
    outputs: frozenset[str]  # requested outputs; empty means all
    empty_final: bool  # Triton's triton_enable_empty_final_response


def _typed(name: str, value: Scalar | str) -> int | float | bool:
    """Check a scalar's kind by the field it sets (bool is not an int here)."""
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        raise invalid(name, f"expected a boolean, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"expected a number, got {value!r}")
    if name in _INT_FIELDS:
        if isinstance(value, float) and not value.is_integer():
            raise invalid(name, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)


def parse_infer(req: pb.ModelInferRequest, info: ModelInfo, tokenizer: Tokenizer) -> InferCall:
    """Validate a ModelInferRequest and build the cluster request."""
    check_model(req.model_name, info, "model_name")
    if req.raw_input_contents and len(req.raw_input_contents) != len(req.inputs):
        raise invalid("raw_input_contents", "needs one entry per input")
    values: dict[str, int | float | bool] = {}
    for key, param in req.parameters.items():
        if key in _INPUTS and key != "text_input":
            value = parameter_value(param)
            if value is not None:
                values[key] = _typed(key, value)
    text: bytes | None = None
    for i, tensor in enumerate(req.inputs):
        raw = req.raw_input_contents[i] if req.raw_input_contents else None
        if tensor.name in _IGNORED_INPUTS:
            continue
        if tensor.name not in _INPUTS:
            raise invalid("inputs", f"unknown input {tensor.name!r}; accepted: {list(_INPUTS)}")
        element = single_element(tensor, raw)
        if tensor.name == "text_input":
            if tensor.datatype != "BYTES" or not isinstance(element, bytes):
                raise invalid("text_input", f"must be BYTES, got {tensor.datatype}")
            text = element
        else:
            values[tensor.name] = _typed(tensor.name, element)
    if text is None:
        raise invalid("text_input", "missing (a BYTES input holding the prompt)")
    try:
        prompt = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid("text_input", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not prompt:
        raise invalid("text_input", "must not be empty")
    outputs = frozenset(o.name for o in req.outputs)
    for name in outputs - set(_OUTPUTS):
        raise invalid("outputs", f"unknown output {name!r}; available: {list(_OUTPUTS)}")
    sampling = SamplingValues(
        **{k: v for k, v in values.items() if k not in ("stream",)}  # type: ignore[arg-type]
    )
    # v2 ids only correlate responses and need not be unique, so the cluster gets its own.
    rid = f"{req.id or 'kserve'}-{uuid.uuid4().hex[:12]}"
    ids = encode_prompt(tokenizer, prompt, info, "text_input")
    request = build_request(rid, ids, sampling, info, "text_input")
    flag = req.parameters.get("triton_enable_empty_final_response")
    empty_final = flag is not None and parameter_value(flag) is True
    return InferCall(request, bool(values.get("stream", False)), outputs, empty_final)


def infer_response(
    req: pb.ModelInferRequest,
    info: ModelInfo,
    call: InferCall | None,
    text: str,
    finish_reason: str | None,
    final: bool | None,
) -> pb.ModelInferResponse:
    """A response with text_output (and finish_reason when given); final marks Triton's last."""
    resp = pb.ModelInferResponse(
        model_name=info.name, model_version=req.model_version or MODEL_VERSION, id=req.id
    )
    items = [("text_output", text)]
    if finish_reason is not None:
        items.append(("finish_reason", finish_reason))
    for name, value in items:
        if call is not None and call.outputs and name not in call.outputs:
            continue
        tensor, raw = bytes_output(name, [value.encode("utf-8")])
        resp.outputs.append(tensor)
        resp.raw_output_contents.append(raw)
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    return resp


class KServeService:
    """Handlers of inference.GRPCInferenceService; the server wires them by method name."""

    def __init__(self, dispatcher: Dispatcher, tokenizer: Tokenizer, version: str) -> None:
        self._dispatcher = dispatcher
        self._tokenizer = tokenizer
        self._version = version

    def _info(self) -> ModelInfo:
        return self._dispatcher.cluster.model_info()

    async def ServerLive(
        self, req: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """The process answers."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, req: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Every required pool has a worker and we are not draining."""
        return pb.ServerReadyResponse(ready=self._dispatcher.admitting())

    async def ModelReady(
        self, req: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """The served model is ready (false for any other name)."""
        ready = req.name == self._info().name and self._dispatcher.admitting()
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, req: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Server name and version."""
        return pb.ServerMetadataResponse(name="batonserve", version=self._version, extensions=[])

    async def ModelMetadata(
        self, req: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """The model's tensors; NOT_FOUND for another name."""
        info = self._info()
        if req.name != info.name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"name: unknown model {req.name!r}; this server serves {info.name!r}",
            )
        resp = pb.ModelMetadataResponse(
            name=info.name, versions=[MODEL_VERSION], platform="batonserve"
        )
        for name, dtype in _INPUT_METADATA:
            resp.inputs.add(name=name, datatype=dtype, shape=[1])
        for name in _OUTPUTS:
            resp.outputs.add(name=name, datatype="BYTES", shape=[-1])
        return resp

    async def ModelInfer(
        self, req: pb.ModelInferRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Generate the whole completion and answer once."""
        try:
            if isinstance(req, Malformed):
                raise req.error()
            info = self._info()
            call = parse_infer(req, info, self._tokenizer)
        except Exception as e:
            self._dispatcher.refused(e)
            await abort_with(context, e, "ModelInfer")
        try:
            texts: list[str] = []
            finish = "abort"
            async for delta in self._dispatcher.stream(call.request):
                texts.append(delta.text)
                finish = delta.finish_reason or finish
        except Exception as e:
            await abort_with(context, e, "ModelInfer")
        return infer_response(req, info, call, "".join(texts), finish, None)

    async def _responses(self, req: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        """The responses to one request of a ModelStreamInfer call."""
        info = self._info()
        try:
            call = parse_infer(req, info, self._tokenizer)
        except Exception as e:
            self._dispatcher.refused(e)
            raise
        texts: list[str] = []
        finish = "abort"  # if the cluster ends the stream without saying why
        async for delta in self._dispatcher.stream(call.request):
            finish = delta.finish_reason or finish
            if call.stream:
                last = delta.finish_reason is not None and not call.empty_final
                yield infer_response(req, info, call, delta.text, delta.finish_reason, last)
            texts.append(delta.text)
        if not call.stream:
            yield infer_response(req, info, call, "".join(texts), finish, not call.empty_final)
        if call.empty_final:
            empty = pb.ModelInferResponse(
                model_name=info.name, model_version=req.model_version or MODEL_VERSION, id=req.id
            )
            empty.parameters["triton_final_response"].bool_param = True
            yield empty

    async def ModelStreamInfer(
        self,
        requests: AsyncIterator[pb.ModelInferRequest | Malformed],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Many requests on one stream, served concurrently; errors travel as error_message."""
        queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def run_one(req: pb.ModelInferRequest | Malformed) -> None:
            try:
                if isinstance(req, Malformed):
                    err = req.error()
                    self._dispatcher.refused(err)
                    raise err
                async for resp in self._responses(req):
                    await queue.put(pb.ModelStreamInferResponse(infer_response=resp))
            except Exception as e:
                err = to_request_error(e, "ModelStreamInfer")
                rid = "" if isinstance(req, Malformed) else req.id
                await queue.put(
                    pb.ModelStreamInferResponse(
                        error_message=f"{err.code.name}: {err.message}",
                        infer_response=pb.ModelInferResponse(id=rid),
                    )
                )

        async def read_all() -> None:
            try:
                async for req in requests:
                    task = asyncio.create_task(run_one(req))
                    tasks.add(task)
                if tasks:
                    await asyncio.wait(tasks)
            finally:
                await queue.put(None)

        reader = asyncio.create_task(read_all())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            # The client hung up or the call was cancelled: abort what still runs.
            reader.cancel()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *tasks, return_exceptions=True)

"""One request over gRPC, timed: native batonserve.v1 Generate, or KServe ModelStreamInfer."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import grpc

from batonserve.cluster.bench.workload import (
    BenchRequest,
    fit_to_context,
    synthetic_text,
    synthetic_token_ids,
)
from batonserve.proto import generation_pb2 as gpb
from batonserve.proto import generation_pb2_grpc, kserve_v2_pb2_grpc
from batonserve.proto import kserve_v2_pb2 as kpb

OK = "OK"
_MAX_MESSAGE = 64 * 1024 * 1024  # enormous prompts are a legitimate benchmark


@dataclass
class RequestResult:
    """Timings of one request (seconds, from the bench start) and how it ended."""

    index: int
    start_s: float
    prompt_tokens: int
    output_tokens: int = 0
    first_token_s: float | None = None
    end_s: float = 0.0
    # Gaps between consecutive tokens; a message carrying k tokens adds k gaps of (dt / k).
    tbt_s: list[float] = field(default_factory=list)
    code: str = OK  # gRPC status code name

    @property
    def ok(self) -> bool:
        """True when the request finished without an error."""
        return self.code == OK

    @property
    def ttft_s(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float:
        """End-to-end latency."""
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to authenticate."""

    target: str
    ca_file: str = ""
    token_file: str = ""
    timeout_s: float = 60.0


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None


def open_channel(conn: Connection) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """An asyncio channel and the call metadata (bearer token from a file, never a flag)."""
    options = [
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ]
    if conn.ca_file:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(conn.ca_file, "--ca-file"))
        channel = grpc.aio.secure_channel(conn.target, creds, options=options)
    else:
        channel = grpc.aio.insecure_channel(conn.target, options=options)
    token = _read(conn.token_file, "--token-file").decode().strip() if conn.token_file else ""
    return channel, ((("authorization", f"Bearer {token}"),) if token else ())


class Timer:
    """Records token arrivals into a RequestResult."""

    def __init__(self, result: RequestResult, t0: float) -> None:
        self.result, self.t0 = result, t0
        self.last: float | None = None

    def tokens(self, n: int) -> None:
        """`n` tokens arrived now."""
        now = time.perf_counter() - self.t0
        if n <= 0:
            return
        if self.last is None:
            self.result.first_token_s = now
            self.result.tbt_s.extend([0.0] * (n - 1))  # tokens that came with the first
        else:
            self.result.tbt_s.extend([(now - self.last) / n] * n)
        self.last = now
        self.result.output_tokens += n


class Driver(Protocol):
    """Sends one request and times it."""

    async def prepare(self) -> None:
        """Learn what the server serves (context length, vocabulary, model name)."""
        ...

    async def send(self, req: BenchRequest, t0: float) -> RequestResult:
        """Run `req` to its end; never raises for a failed RPC (its code is recorded)."""
        ...


class NativeDriver:
    """batonserve.v1.Generation/Generate with synthetic token_ids, ignore_eos for exact lengths."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: tuple[tuple[str, str], ...],
        timeout_s: float,
        seed: int,
    ) -> None:
        self._stub = generation_pb2_grpc.GenerationStub(channel)
        self._metadata, self._timeout, self._rng = metadata, timeout_s, random.Random(seed)
        self.context_length = 0
        self.vocab_size = 0

    async def prepare(self) -> None:
        """GetModelInfo: prompts must fit the context and use ids of the vocabulary."""
        info = await self._stub.GetModelInfo(
            gpb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata
        )
        self.context_length, self.vocab_size = info.context_length, info.vocab_size

    async def send(self, req: BenchRequest, t0: float) -> RequestResult:
        """Stream one request."""
        p, o = fit_to_context(req.prompt_tokens, req.output_tokens, self.context_length)
        ids = synthetic_token_ids(p, self.vocab_size, self._rng)
        msg = gpb.GenerateRequest(
            request_id=f"bench-{req.index}-{uuid.uuid4().hex[:12]}",  # unique across runs
            token_ids=gpb.TokenIds(ids=ids),
            sampling=gpb.SamplingParams(max_tokens=o, ignore_eos=True),
        )
        result = RequestResult(req.index, time.perf_counter() - t0, p)
        timer = Timer(result, t0)
        try:
            async for resp in self._stub.Generate(
                msg, timeout=self._timeout, metadata=self._metadata
            ):
                timer.tokens(len(resp.token_ids))
        except grpc.aio.AioRpcError as e:
            result.code = e.code().name
        result.end_s = time.perf_counter() - t0
        return result


def _error_code(message: str) -> str:
    """The status name our KServe errors start with ('RESOURCE_EXHAUSTED: ...'), else UNKNOWN."""
    head = message.split(":", 1)[0].strip()
    return head if head in grpc.StatusCode.__members__ else "UNKNOWN"


class KServeDriver:
    """KServe v2 ModelStreamInfer (Triton's streaming extension) with a text prompt."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        metadata: tuple[tuple[str, str], ...],
        timeout_s: float,
        seed: int,
        model: str = "",
        context_length: int = 0,
    ) -> None:
        self._stub = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(channel)
        self._native = generation_pb2_grpc.GenerationStub(channel)
        self._metadata, self._timeout, self._rng = metadata, timeout_s, random.Random(seed)
        self.model, self.context_length = model, context_length

    async def prepare(self) -> None:
        """The model name from ServerMetadata/GetModelInfo when not given; context if known."""
        if self.model and self.context_length:
            return
        try:  # batonserve serves both protocols on one port; other KServe servers do not
            info = await self._native.GetModelInfo(
                gpb.GetModelInfoRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            if not self.model:
                raise ValueError(
                    "--model: required for a KServe server without batonserve.v1"
                ) from None
            return
        self.model = self.model or info.name
        self.context_length = self.context_length or info.context_length

    def _request(self, req: BenchRequest, p: int, o: int) -> kpb.ModelInferRequest:
        text = kpb.ModelInferRequest.InferInputTensor(
            name="text_input", datatype="BYTES", shape=[1]
        )
        text.contents.bytes_contents.append(synthetic_text(p, self._rng).encode())
        msg = kpb.ModelInferRequest(model_name=self.model, id=f"bench-{req.index}", inputs=[text])
        msg.parameters["max_tokens"].int64_param = o
        msg.parameters["ignore_eos"].bool_param = True
        msg.parameters["stream"].bool_param = True
        return msg

    async def send(self, req: BenchRequest, t0: float) -> RequestResult:
        """One request on its own ModelStreamInfer call; one streamed response per delta."""
        p, o = req.prompt_tokens, req.output_tokens
        if self.context_length:
            # Words may be more than one token each: leave a quarter of the room as margin.
            p, o = fit_to_context(p, o, self.context_length)
            p = max(1, min(p, (self.context_length - o) * 3 // 4))
        result = RequestResult(req.index, time.perf_counter() - t0, p)
        timer = Timer(result, t0)
        call = self._stub.ModelStreamInfer(timeout=self._timeout, metadata=self._metadata)
        try:
            await call.write(self._request(req, p, o))
            await call.done_writing()
            async for resp in call:
                if resp.error_message:
                    result.code = _error_code(resp.error_message)
                    break
                r = resp.infer_response
                final = "triton_final_response" in r.parameters and bool(
                    r.parameters["triton_final_response"].bool_param
                )
                # No token ids in KServe: each delta counts as one token; the last one only
                # when it carries text.
                if not final or (r.raw_output_contents and r.raw_output_contents[0][4:]):
                    timer.tokens(1)
                if final:
                    break
        except grpc.aio.AioRpcError as e:
            result.code = e.code().name
        except asyncio.CancelledError:
            call.cancel()
            raise
        finally:
            call.cancel()  # a no-op once the call has ended
        result.end_s = time.perf_counter() - t0
        return result

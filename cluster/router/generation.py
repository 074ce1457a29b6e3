"""The native `batonserve.v1.Generation` service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from batonserve.cluster.api import GenerateRequest, TokenDelta
from batonserve.cluster.router.dispatch import Dispatcher
from batonserve.cluster.router.errors import abort_with, invalid
from batonserve.cluster.router.handlers import Malformed
from batonserve.cluster.router.validation import (
    SamplingValues,
    build_request,
    check_model,
    check_token_ids,
    encode_prompt,
)
from batonserve.proto import generation_pb2 as pb
from batonserve.workers.tokenizer import Tokenizer

SERVICE_NAME = "batonserve.v1.Generation"


def sampling_values(msg: pb.SamplingParams) -> SamplingValues:
    """Optional proto fields become None when unset (so unset differs from zero)."""
    return SamplingValues(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        temperature=msg.temperature if msg.HasField("temperature") else None,
        top_p=msg.top_p if msg.HasField("top_p") else None,
        top_k=msg.top_k if msg.HasField("top_k") else None,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos if msg.HasField("ignore_eos") else None,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def delta_to_proto(request_id: str, delta: TokenDelta) -> pb.GenerateResponse:
    """One streamed message; the last carries finish_reason and usage."""
    out = pb.GenerateResponse(request_id=request_id, token_ids=delta.token_ids, text=delta.text)
    if delta.finish_reason is not None:
        out.finish_reason = delta.finish_reason
    if delta.usage is not None:
        out.usage.prompt_tokens = delta.usage.prompt_tokens
        out.usage.completion_tokens = delta.usage.completion_tokens
        out.usage.cached_tokens = delta.usage.cached_tokens
    for tok, lp in zip(delta.token_ids, delta.logprobs, strict=False):
        # An unknown entry (rare: a handoff whose prefill report came late) keeps its place: NaN.
        if lp is None:
            out.logprobs.add(token_id=tok, logprob=float("nan"))
            continue
        item = out.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
        for tid, value in lp.top:
            item.top.add(token_id=tid, logprob=value)
    return out


class GenerationService:
    """Handlers of batonserve.v1.Generation; the server wires them by method name."""

    def __init__(self, dispatcher: Dispatcher, tokenizer: Tokenizer, version: str) -> None:
        self._dispatcher = dispatcher
        self._tokenizer = tokenizer
        self._version = version

    def _to_cluster_request(self, req: pb.GenerateRequest) -> GenerateRequest:
        info = self._dispatcher.cluster.model_info()
        check_model(req.model, info)
        which = req.WhichOneof("input")
        if which is None:
            raise invalid("input", "give either text or token_ids")
        if which == "text":
            if req.text == "":
                raise invalid("text", "must not be empty")
            ids = encode_prompt(self._tokenizer, req.text, info, "text")
            field = "text"
        else:
            if not req.token_ids.ids:
                raise invalid("token_ids", "must not be empty")
            ids = list(check_token_ids(req.token_ids.ids, info, "token_ids.ids"))
            field = "token_ids"
        return build_request(
            req.request_id, ids, sampling_values(req.sampling), info, field, "sampling."
        )

    async def Generate(
        self, req: pb.GenerateRequest | Malformed, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream one request's tokens."""
        try:
            if isinstance(req, Malformed):
                raise req.error()
            request = self._to_cluster_request(req)
        except Exception as e:
            self._dispatcher.refused(e)
            await abort_with(context, e, "Generate")
        try:
            async for delta in self._dispatcher.stream(request):
                yield delta_to_proto(request.request_id, delta)
        except Exception as e:
            await abort_with(context, e, "Generate")

    async def GetModelInfo(
        self, req: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        """The served model."""
        try:
            info = self._dispatcher.cluster.model_info()
        except Exception as e:
            await abort_with(context, e, "GetModelInfo")
        return pb.GetModelInfoResponse(
            name=info.name,
            architecture=info.architecture,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            is_moe=info.is_moe,
        )

    async def GetServerInfo(
        self, req: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        """Pools and workers."""
        try:
            info = self._dispatcher.cluster.server_info()
            model = self._dispatcher.cluster.model_info().name
        except Exception as e:
            await abort_with(context, e, "GetServerInfo")
        out = pb.GetServerInfoResponse(pools=info.pools, model=model, version=self._version)
        for w in info.workers:
            out.workers.add(
                name=w.name,
                pool=w.pool,
                role=w.role,
                healthy=w.healthy,
                running_requests=w.running_requests,
                waiting_requests=w.waiting_requests,
                pending_prefill_tokens=w.pending_prefill_tokens,
                kv_cache_usage=w.kv_cache_usage,
                tensor_parallel_size=w.tensor_parallel_size,
                rank_param_bytes=w.rank_param_bytes,
            )
        return out

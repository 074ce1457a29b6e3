"""OpenAI response JSON: completions and chat, whole and as stream chunks, plus the error shape."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from batonserve.cluster.api import TokenDelta, Usage
from batonserve.cluster.router.errors import RequestError
from batonserve.cluster.router.openai_protocol import OpenAIRequest
from batonserve.workers.outputs import TokenLogprobs
from batonserve.workers.tokenizer import Tokenizer

# The HTTP status of each gRPC code the shared checks and the dispatcher raise.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# OpenAI's error types by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    429: "rate_limit_exceeded",
}


def error_body(err: RequestError) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI's error JSON); `param` is the field a 400 names."""
    status = HTTP_STATUS.get(err.code, 500)
    param = None
    if status == 400 and ": " in err.message:
        param = err.message.split(": ", 1)[0]
    body = {
        "message": err.message,
        "type": ERROR_TYPES.get(status, "server_error"),
        "param": param,
        "code": err.code.name.lower(),
    }
    return status, {"error": body}


def usage_json(req: OpenAIRequest, states: Sequence[ChoiceState]) -> dict[str, Any]:
    """Usage over every choice; each prompt counts once however many choices it has."""
    prompts: dict[int, int] = {}
    cached: dict[int, int] = {}
    completion = 0
    for ch, st in zip(req.choices, states, strict=True):
        prompts[ch.prompt_index] = len(ch.request.prompt_token_ids)
        if st.usage is not None:
            cached.setdefault(ch.prompt_index, st.usage.cached_tokens)
            completion += st.usage.completion_tokens
        else:
            completion += len(st.token_ids)
    prompt = sum(prompts.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }


@dataclass
class ChoiceState:
    """One choice as it is built (whole responses) or streamed (chunks)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    started: bool = False  # the first chunk went out (chat's role; completions' echo)

    def add(self, delta: TokenDelta) -> None:
        """Fold one delta in."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.usage = delta.usage


class Formatter:
    """Builds the JSON of one OpenAI request's responses."""

    def __init__(self, req: OpenAIRequest, tokenizer: Tokenizer) -> None:
        self.req = req
        self._tok = tokenizer
        self.created = int(time.time())
        self._object = "chat.completion" if req.kind == "chat" else "text_completion"
        self._offsets = [0] * len(req.choices)  # completions' text_offset, per choice

    def _token(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(
        self, ids: Sequence[int], lps: Sequence[TokenLogprobs | None]
    ) -> dict[str, Any]:
        content = []
        for tid, lp in zip(ids, lps, strict=False):
            text = self._token(tid)
            top = [] if lp is None else lp.top
            content.append(
                {
                    "token": text,
                    "logprob": None if lp is None else lp.logprob,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {"token": (t := self._token(i)), "logprob": v, "bytes": list(t.encode())}
                        for i, v in top
                    ],
                }
            )
        return {"content": content}

    def _completion_logprobs(
        self, index: int, ids: Sequence[int], lps: Sequence[TokenLogprobs | None]
    ) -> dict[str, Any]:
        tokens, values, tops, offsets = [], [], [], []
        for tid, lp in zip(ids, lps, strict=False):
            text = self._token(tid)
            tokens.append(text)
            values.append(None if lp is None else lp.logprob)
            top: dict[str, float] = {}
            if lp is not None:
                top[text] = lp.logprob  # vLLM lists the chosen token among the top ones
                for i, v in lp.top:
                    top.setdefault(self._token(i), v)
            tops.append(top)
            offsets.append(self._offsets[index])
            self._offsets[index] += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _logprobs(
        self, index: int, ids: Sequence[int], lps: Sequence[TokenLogprobs | None]
    ) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        if self.req.kind == "chat":
            return self._chat_logprobs(ids, lps)
        return self._completion_logprobs(index, ids, lps)

    def _echo(self, index: int) -> str:
        if not self.req.echo:
            return ""
        return self.req.prompt_texts[self.req.choices[index].prompt_index]

    def whole(self, states: Sequence[ChoiceState]) -> dict[str, Any]:
        """The non-streaming response."""
        choices = []
        for i, st in enumerate(states):
            choice: dict[str, Any] = {"index": i}
            if self.req.kind == "chat":
                choice["message"] = {"role": "assistant", "content": st.text}
            else:
                choice["text"] = self._echo(i) + st.text
            choice["logprobs"] = self._logprobs(i, st.token_ids, st.logprobs)
            choice["finish_reason"] = st.finish_reason
            choices.append(choice)
        return {
            "id": self.req.id,
            "object": self._object,
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
            "usage": usage_json(self.req, states),
        }

    def chunk(self, index: int, st: ChoiceState, delta: TokenDelta) -> dict[str, Any] | None:
        """One stream chunk for a delta of choice `index`, or None when it carries nothing."""
        first = not st.started
        st.started = True
        st.add(delta)
        text = delta.text
        if self.req.kind == "completion":
            text = (self._echo(index) if first else "") + text
        if not (text or delta.token_ids or delta.finish_reason or first):
            return None
        choice: dict[str, Any] = {"index": index}
        if self.req.kind == "chat":
            msg: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or first:
                msg["content"] = text
            choice["delta"] = msg
        else:
            choice["text"] = text
        choice["logprobs"] = self._logprobs(index, delta.token_ids, delta.logprobs)
        choice["finish_reason"] = delta.finish_reason
        out = {
            "id": self.req.id,
            "object": f"{self._object}.chunk" if self.req.kind == "chat" else self._object,
            "created": self.created,
            "model": self.req.model,
            "choices": [choice],
        }
        if self.req.include_usage:
            out["usage"] = None  # as OpenAI: null on every chunk but the last
        return out

    def usage_chunk(self, states: Sequence[ChoiceState]) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices, the usage."""
        return {
            "id": self.req.id,
            "object": "chat.completion.chunk" if self.req.kind == "chat" else self._object,
            "created": self.created,
            "model": self.req.model,
            "choices": [],
            "usage": usage_json(self.req, states),
        }

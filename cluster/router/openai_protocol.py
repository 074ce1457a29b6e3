"""OpenAI request bodies (completions and chat) turned into the cluster's typed requests.

Only the JSON shapes live here; every sampling and prompt check is validation.py's, shared with
the gRPC API, so both protocols accept and refuse the same values.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from batonserve.cluster.api import GenerateRequest, ModelInfo
from batonserve.cluster.router.chat_template import ChatMessage, ChatTemplate
from batonserve.cluster.router.errors import RequestError, invalid
from batonserve.cluster.router.validation import (
    SamplingValues,
    build_request,
    check_model,
    check_token_ids,
    encode_prompt,
)
from batonserve.workers.tokenizer import Tokenizer

Kind = Literal["completion", "chat"]
MAX_N = 16  # choices per request (each is its own cluster request)
ROLES = ("system", "developer", "user", "assistant", "tool")
# Accepted at their neutral value only: anything else would be silently ignored otherwise.
NEUTRAL: dict[str, tuple[object, ...]] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "min_tokens": (0,),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
}
_TYPES: dict[type, str] = {
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    str: "a string",
    list: "an array",
}


@dataclass(frozen=True)
class Choice:
    """One cluster request of an OpenAI request: choice `index` of prompt `prompt_index`."""

    index: int
    prompt_index: int
    request: GenerateRequest


@dataclass(frozen=True)
class OpenAIRequest:
    """A validated completions or chat request, ready to run."""

    kind: Kind
    id: str
    model: str
    choices: tuple[Choice, ...]
    prompt_texts: tuple[str, ...]  # per prompt, for echo
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-n per token; None: no logprobs asked
    echo: bool


def _get(body: Mapping[str, Any], name: str, kind: type) -> Any:
    """body[name] if present and of `kind` (ints count as numbers, bools never as ints)."""
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise invalid(name, f"must be {_TYPES[kind]}, got {type(value).__name__}")
    return float(value) if kind is float else value


def _check_neutral(body: Mapping[str, Any]) -> None:
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] is not None and body[name] not in neutral:
            raise invalid(name, "is not supported by batonserve (leave it unset)")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise invalid("response_format", 'only {"type": "text"} is supported')
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise invalid("best_of", "is not supported by batonserve (leave it unset or equal to n)")


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise invalid("stop", "must be a string or an array of strings")


def _int_list(value: object) -> list[int] | None:
    if isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        return value
    return None


def _values(body: Mapping[str, Any], max_tokens: str, logprobs: int | None) -> SamplingValues:
    stop_ids = body.get("stop_token_ids")
    ids = _int_list(stop_ids) if stop_ids is not None else []
    if ids is None:
        raise invalid("stop_token_ids", "must be an array of token ids")
    return SamplingValues(
        max_tokens=_get(body, max_tokens, int),
        temperature=_get(body, "temperature", float),
        top_p=_get(body, "top_p", float),
        top_k=_top_k(body),
        seed=_get(body, "seed", int),
        stop=_stop(body),
        stop_token_ids=tuple(ids),
        ignore_eos=_get(body, "ignore_eos", bool),
        logprobs=logprobs,
    )


def _top_k(body: Mapping[str, Any]) -> int | None:
    top_k = _get(body, "top_k", int)
    return 0 if top_k == -1 else top_k  # vLLM's "no cut" is -1; ours is 0


def _renamed(err: RequestError, names: Mapping[str, str]) -> RequestError:
    """Name the field the client sent where it differs from the shared check's name."""
    for ours, theirs in names.items():
        if err.message.startswith(f"{ours}:"):
            return invalid(theirs, err.message.split(": ", 1)[1])
    return err


def _choices(
    rid: str,
    prompts: Sequence[Sequence[int]],
    values: SamplingValues,
    info: ModelInfo,
    n: int,
    input_field: str,
    names: Mapping[str, str],
) -> tuple[Choice, ...]:
    """n cluster requests per prompt; with a seed, choice j samples with seed + j."""
    out: list[Choice] = []
    for p, ids in enumerate(prompts):
        field = input_field if len(prompts) == 1 else f"{input_field}[{p}]"
        for j in range(n):
            v = values if values.seed is None else replace(values, seed=values.seed + j)
            try:
                req = build_request(f"{rid}-{len(out)}", ids, v, info, field)
            except RequestError as e:
                raise _renamed(e, names) from None
            out.append(Choice(len(out), p, req))
    return tuple(out)


def _common(body: Mapping[str, Any], info: ModelInfo) -> tuple[str, int, bool, bool]:
    model = _get(body, "model", str) or ""
    check_model(model, info)
    n = _get(body, "n", int)
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise invalid("n", f"must be in [1, {MAX_N}], got {n}")
    stream = bool(_get(body, "stream", bool))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("stream_options", "must be an object")
    if options and not stream:
        raise invalid("stream_options", "is only allowed with stream: true")
    include_usage = bool(_get(options or {}, "include_usage", bool))
    _check_neutral(body)
    return info.name, n, stream, include_usage


def parse_completion(
    body: Mapping[str, Any], info: ModelInfo, tokenizer: Tokenizer
) -> OpenAIRequest:
    """POST /v1/completions."""
    model, n, stream, include_usage = _common(body, info)
    prompt = body.get("prompt")
    texts: list[str] = []
    prompts: list[list[int]] = []
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    elif (ids := _int_list(prompt)) is not None and ids:
        prompts = [ids]
    elif isinstance(prompt, list) and prompt and all(_int_list(p) for p in prompt):
        prompts = [list(p) for p in prompt]
    else:
        raise invalid(
            "prompt", "must be a non-empty string, array of strings, or array of token ids"
        )
    for i, text in enumerate(texts):
        field = "prompt" if len(texts) == 1 else f"prompt[{i}]"
        if text == "":
            raise invalid(field, "must not be empty")
        prompts.append(encode_prompt(tokenizer, text, info, field))
    if not texts:
        for i, ids in enumerate(prompts):
            check_token_ids(ids, info, "prompt" if len(prompts) == 1 else f"prompt[{i}]")
        texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
    logprobs = _get(body, "logprobs", int)
    echo = bool(_get(body, "echo", bool))
    if echo and logprobs is not None:
        raise invalid("echo", "cannot be combined with logprobs (prompt logprobs are not kept)")
    rid = f"cmpl-{uuid.uuid4().hex}"
    values = _values(body, "max_tokens", logprobs)
    choices = _choices(rid, prompts, values, info, n, "prompt", {})
    return OpenAIRequest(
        "completion", rid, model, choices, tuple(texts), stream, include_usage, logprobs, echo
    )


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise invalid(f"messages[{i}].content", "must be a string or an array of content parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise invalid(f"messages[{i}].content[{j}]", "only text parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"messages[{i}].content[{j}].text", "must be a string")
        texts.append(text)
    return "\n".join(texts)  # as vLLM joins text parts for string templates


def parse_chat(
    body: Mapping[str, Any], info: ModelInfo, tokenizer: Tokenizer, template: ChatTemplate | None
) -> OpenAIRequest:
    """POST /v1/chat/completions."""
    model, n, stream, include_usage = _common(body, info)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty array of messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role", f"must be one of {list(ROLES)}, got {role!r}")
        parsed.append(ChatMessage(role, _content(m, i)))
    if template is None:
        raise invalid(
            "messages",
            f"model {info.name!r} has no chat template (tokenizer_config.json chat_template or "
            "chat_template.jinja); start the server with router.chat_template / --chat-template "
            "FILE, or use /v1/completions",
        )
    add_generation_prompt = _get(body, "add_generation_prompt", bool)
    text = template.render(parsed, True if add_generation_prompt is None else add_generation_prompt)
    # The template writes the special tokens itself (bos_token), so none are added again.
    ids = encode_prompt(tokenizer, text, info, "messages", add_special_tokens=False)
    want = _get(body, "logprobs", bool)
    top = _get(body, "top_logprobs", int)
    if top is not None and not want:
        raise invalid("top_logprobs", "needs logprobs: true")
    logprobs = (top or 0) if want else None
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else None
    values = _values(body, limit or "max_tokens", logprobs)
    if values.max_tokens is None:  # as OpenAI and vLLM: a chat answer may use the whole context
        values = replace(values, max_tokens=max(1, info.context_length - len(ids)))
    names = {"logprobs": "top_logprobs", **({"max_tokens": limit} if limit else {})}
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    choices = _choices(rid, [ids], values, info, n, "messages", names)
    return OpenAIRequest(
        "chat", rid, model, choices, (text,), stream, include_usage, logprobs, False
    )

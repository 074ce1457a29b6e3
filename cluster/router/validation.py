"""Checks raw request values and turns them into the cluster's GenerateRequest.

Both protocols funnel through here, so they accept and reject the same things; messages name
the field the client sent (`sampling.max_tokens` natively, `max_tokens` in KServe).
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from batonserve.cluster.api import GenerateRequest, ModelInfo
from batonserve.cluster.router.errors import RequestError, invalid
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = SamplingParams().max_tokens
MAX_LOGPROBS = 20  # top-n logprobs per token at most (vLLM's max_logprobs default)


@dataclass(frozen=True)
class SamplingValues:
    """Sampling fields as the client sent them; None means unset."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool | None = None
    logprobs: int | None = None  # top-n candidates per token; 0: the chosen token's only


def check_model(requested: str, info: ModelInfo, field_name: str = "model") -> None:
    """NOT_FOUND unless `requested` is empty or the served model's name."""
    if requested and requested != info.name:
        raise RequestError(
            grpc.StatusCode.NOT_FOUND,
            f"{field_name}: unknown model {requested!r}; this server serves {info.name!r}",
        )


@functools.cache
def _max_token_chars(tokenizer: Tokenizer) -> int:
    """The most characters one token of the vocabulary stands for (computed once)."""
    ids = range(tokenizer.vocab_size)
    return max((len(tokenizer.decode([i], skip_special_tokens=False)) for i in ids), default=1)


def encode_prompt(
    tokenizer: Tokenizer,
    text: str,
    info: ModelInfo,
    field_name: str,
    add_special_tokens: bool = True,
) -> list[int]:
    """Tokenize a text prompt, refusing first any text too long to fit the context.

    Tokenizing megabytes takes seconds on the router's event loop and would stall every other
    stream. No text longer than context x (the longest token) can fit; the factor 2 leaves room
    for normalizers that merge characters.
    """
    limit = 2 * info.context_length * _max_token_chars(tokenizer)
    if len(text) > limit:
        raise invalid(
            field_name,
            f"{len(text)} characters cannot fit the model's context of "
            f"{info.context_length} tokens",
        )
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def check_token_ids(ids: Sequence[int], info: ModelInfo, field_name: str) -> tuple[int, ...]:
    """Every id must be in the vocabulary."""
    for i, t in enumerate(ids):
        if not 0 <= t < info.vocab_size:
            raise invalid(
                f"{field_name}[{i}]", f"{t} is outside the vocabulary (size {info.vocab_size})"
            )
    return tuple(ids)


def build_sampling(
    values: SamplingValues, prompt_len: int, info: ModelInfo, prefix: str = ""
) -> SamplingParams:
    """Validate sampling values against the model and the prompt; defaults fill unset fields."""
    room = info.context_length - prompt_len  # tokens left in the context after the prompt
    if values.max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    else:
        max_tokens = values.max_tokens
        if max_tokens < 1:
            raise invalid(f"{prefix}max_tokens", f"must be at least 1, got {max_tokens}")
        if max_tokens > room:
            raise invalid(
                f"{prefix}max_tokens",
                f"{max_tokens} new tokens do not fit: the prompt has {prompt_len} tokens and "
                f"the context is {info.context_length}",
            )
    kwargs: dict[str, object] = {"max_tokens": max_tokens}
    if values.temperature is not None:
        if not math.isfinite(values.temperature) or values.temperature < 0:
            raise invalid(
                f"{prefix}temperature", f"must be a finite number >= 0, got {values.temperature}"
            )
        kwargs["temperature"] = float(values.temperature)
    if values.top_p is not None:
        if not math.isfinite(values.top_p) or not 0 < values.top_p <= 1:
            raise invalid(f"{prefix}top_p", f"must be in (0, 1], got {values.top_p}")
        kwargs["top_p"] = float(values.top_p)
    if values.top_k is not None:
        if values.top_k < 0:
            raise invalid(f"{prefix}top_k", f"must be >= 0 (0 disables it), got {values.top_k}")
        kwargs["top_k"] = values.top_k
    if values.seed is not None:
        if values.seed < 0:
            raise invalid(f"{prefix}seed", f"must be >= 0, got {values.seed}")
        kwargs["seed"] = values.seed
    for i, s in enumerate(values.stop):
        if s == "":
            raise invalid(f"{prefix}stop[{i}]", "must not be empty")
    kwargs["stop"] = values.stop
    kwargs["stop_token_ids"] = check_token_ids(
        values.stop_token_ids, info, f"{prefix}stop_token_ids"
    )
    if values.ignore_eos is not None:
        kwargs["ignore_eos"] = values.ignore_eos
    if values.logprobs is not None:
        if not 0 <= values.logprobs <= MAX_LOGPROBS:
            raise invalid(
                f"{prefix}logprobs", f"must be in [0, {MAX_LOGPROBS}], got {values.logprobs}"
            )
        kwargs["logprobs"] = values.logprobs
    try:
        return SamplingParams(**kwargs)  # type: ignore[arg-type]
    except ValueError as e:  # its messages start with the field's name
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{prefix}{e}") from None


def build_request(
    request_id: str,
    prompt_ids: Sequence[int],
    values: SamplingValues,
    info: ModelInfo,
    input_field: str,
    sampling_prefix: str = "",
) -> GenerateRequest:
    """The cluster request for a tokenized prompt; checks the prompt fits the context."""
    if not prompt_ids:
        raise invalid(input_field, "the prompt is empty")
    if len(prompt_ids) >= info.context_length:
        raise invalid(
            input_field,
            f"the prompt is {len(prompt_ids)} tokens; the model's context is "
            f"{info.context_length} tokens, leaving no room to generate",
        )
    sampling = build_sampling(values, len(prompt_ids), info, sampling_prefix)
    return GenerateRequest(
        request_id=request_id or uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt_ids),
        sampling=sampling,
    )

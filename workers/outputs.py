"""Typed objects between the engine core, the output processor and callers (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the sampled token and of the top-n candidates (raw model distribution)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class CoreOutput:
    """One request's token-level progress in one engine-core step.

    In the cluster this is also what a worker hands back to the router, as is: the router's
    output processor consumes it (text, stop strings), so logprobs ride along untouched.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs | None, ...]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or None
    prefilled: bool  # prefill_only request: first token sampled, KV pinned until release
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    error: str = ""  # the engine refused the request (finish_reason "abort"); the worker lives on
    # With a request's first output from a worker: seconds from its submit there to the step that
    # first scheduled it (vLLM's queue time); -1 when unknown.
    queue_s: float = -1.0


def aborted_output(request_id: str, num_prompt_tokens: int, error: str = "") -> CoreOutput:
    """A request that ends here without a token: refused by the engine (`error`) or abandoned."""
    return CoreOutput(request_id, (), (), True, "abort", False, num_prompt_tokens, 0, 0, error)


@dataclass
class RequestOutput:
    """What a caller sees for one request: new tokens and text since the last output.

    From `Engine.step()` token_ids/text/logprobs are the delta of this step; from
    `Engine.generate()` they are the whole completion.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    prefilled: bool = False

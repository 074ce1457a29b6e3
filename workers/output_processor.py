"""Core outputs (token ids) -> caller outputs (text deltas), with stop strings.

Kept apart from the engine core on purpose: in the cluster it runs in the router process while
the engine core runs in a Ray worker, so it needs only the tokenizer, never the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batonserve.workers.outputs import CoreOutput, RequestOutput, TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.tokenizer import IncrementalDetokenizer, Tokenizer


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopStringMatcher:
    """Accumulates text, truncates at the first stop string, holds back possible stop prefixes."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._max = max((len(s) for s in self.stops), default=0)
        self.text = ""  # all text so far (after truncation, once stopped)
        self.emitted = 0  # characters of self.text already released
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        """Add new text; return what may be released now (all of it when `final`)."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self._max + 1)
        self.text += delta
        hit = -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            self.text = self.text[:hit]
            self.stopped = True
            final = True
        end = len(self.text) if final else len(self.text) - stop_holdback(self.text, self.stops)
        out = self.text[self.emitted : max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return out


@dataclass
class _State:
    # No token list here: the caller (the router's RequestState, Engine.generate) keeps the
    # tokens; this holds only what text needs.
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    matcher: StopStringMatcher


@dataclass(frozen=True)
class ProcessedStep:
    """Caller outputs of one step, plus requests a stop string ended (abort them in the core)."""

    outputs: list[RequestOutput]
    stopped: list[str]


class OutputProcessor:
    """Per-request detokenization and stop-string handling for a stream of CoreOutputs."""

    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(eos_token_ids)
        self._states: dict[str, _State] = {}

    def add_request(
        self,
        request_id: str,
        context_token_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        """Start tracking a request; context = prompt (plus tokens already emitted elsewhere)."""
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer.json in the model directory")
        detok = (
            IncrementalDetokenizer(self.tokenizer, context_token_ids) if self.tokenizer else None
        )
        self._states[request_id] = _State(params, detok, StopStringMatcher(params.stop))

    def remove(self, request_id: str) -> None:
        """Forget a request (aborted or released); idempotent."""
        self._states.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def process(self, core_outputs: Sequence[CoreOutput]) -> ProcessedStep:
        """Turn one step's core outputs into caller outputs."""
        outputs: list[RequestOutput] = []
        stopped: list[str] = []
        for co in core_outputs:
            out = self.process_output(co.request_id, co)
            if out is None:
                continue
            if out.finished and not co.finished:
                stopped.append(co.request_id)
            outputs.append(out)
        return ProcessedStep(outputs, stopped)

    def process_output(self, key: str, co: CoreOutput) -> RequestOutput | None:
        """One core output of the request tracked as `key` (the router keeps one key across a
        request's attempts, whose worker-level ids differ); None if `key` is not tracked."""
        st = self._states.get(key)
        if st is None:
            return None
        new_ids = list(co.new_token_ids)
        finished, reason = co.finished, co.finish_reason
        text = self._text(st, new_ids, finished, reason)
        if st.matcher.stopped:
            finished, reason = True, "stop"
        if finished:
            del self._states[key]
        return RequestOutput(
            request_id=key,
            token_ids=new_ids,
            text=text,
            finished=finished,
            finish_reason=reason,
            prompt_tokens=co.num_prompt_tokens,
            completion_tokens=co.num_output_tokens,
            cached_tokens=co.num_cached_tokens,
            logprobs=list(co.logprobs),
            prefilled=co.prefilled and not finished,
        )

    def _text(self, st: _State, new_ids: list[int], finished: bool, reason: str | None) -> str:
        if st.detok is None or st.matcher.stopped:
            return ""
        ids = new_ids
        if finished and reason == "stop" and ids and self._is_stop_token(st.params, ids[-1]):
            ids = ids[:-1]  # the stop / EOS token itself has no text
        delta = st.detok.add(ids)
        if finished:
            delta += st.detok.flush()
        return st.matcher.feed(delta, final=finished)

    def _is_stop_token(self, params: SamplingParams, token: int) -> bool:
        return token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        )


def merge_outputs(a: RequestOutput | None, b: RequestOutput) -> RequestOutput:
    """Fold a step's delta `b` into the running total `a` (for batch generate)."""
    if a is None:
        return b
    logprobs: list[TokenLogprobs | None] = a.logprobs + b.logprobs
    return RequestOutput(
        request_id=b.request_id,
        token_ids=a.token_ids + b.token_ids,
        text=a.text + b.text,
        finished=b.finished,
        finish_reason=b.finish_reason,
        prompt_tokens=b.prompt_tokens,
        completion_tokens=b.completion_tokens,
        cached_tokens=b.cached_tokens,
        logprobs=logprobs,
        prefilled=b.prefilled,
    )

"""Per-request bookkeeping in the router process: attempts, tokens already sent, the output stream.

A request may run as several attempts (a worker died, a handoff failed or its lease ended). Each
attempt has its own worker-level request id, so nothing from an abandoned attempt is ever taken;
the next attempt starts from the prompt plus every token already streamed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Literal

from batonserve.cluster.api import GenerateRequest, TokenDelta, Usage
from batonserve.workers.output_processor import OutputProcessor
from batonserve.workers.outputs import CoreOutput, TokenLogprobs
from batonserve.workers.sampling_params import SamplingParams

Phase = Literal["prefill", "decode"]

# Process-wide, so a client that reuses a finished request_id never meets a worker id the workers
# still remember (they drop late submits of ids they aborted).
_WORKER_IDS = itertools.count(1)


@dataclass
class Attempt:
    """One try at (the rest of) a request on one pair of workers."""

    number: int
    worker_request_id: str  # "<request_id>#<process-wide sequence number>"
    prefill: str  # equals decode when in place
    decode: str
    started_at: float = field(default_factory=time.monotonic)  # submitted (router's clock)
    handoff_id: int | None = None
    phase: Phase = "prefill"  # "decode" once the decode side owns the request
    # A disaggregated attempt's first token comes back one way only: in the prefill side's
    # output (with its logprobs). Decode outputs that overtake it wait in `held`.
    first_token_in: bool = False
    held: list[CoreOutput] = field(default_factory=list)

    @property
    def disaggregated(self) -> bool:
        """Prefill and decode run on different workers."""
        return self.prefill != self.decode

    def uses(self, worker: str) -> bool:
        """True when this attempt still depends on `worker` (the prefill side until its first
        token is in, even once the decode side owns the request)."""
        if self.phase == "decode" and self.first_token_in:
            return worker == self.decode
        return worker in (self.prefill, self.decode)


@dataclass
class RequestState:
    """A request the cluster is serving."""

    request: GenerateRequest
    queue: asyncio.Queue[TokenDelta | BaseException] = field(default_factory=asyncio.Queue)
    produced: list[int] = field(default_factory=list)  # streamed to the client, all attempts
    attempt: Attempt | None = None
    attempts: int = 0
    cached_tokens: int = -1
    done: bool = False
    scheduled_at: float | None = None  # router's clock: a worker first scheduled it (queue end)

    @property
    def request_id(self) -> str:
        """The client's request id."""
        return self.request.request_id

    def next_attempt(self, prefill: str, decode: str) -> Attempt:
        """Start a new attempt on the given pair (forgetting the previous one)."""
        self.attempts += 1
        wid = f"{self.request_id}#{next(_WORKER_IDS)}"
        self.attempt = Attempt(self.attempts, wid, prefill, decode)
        return self.attempt

    def scheduled(self, attempt: Attempt, queue_s: float) -> None:
        """The worker says the first attempt waited `queue_s` in its queue (once; resumes aside)."""
        if self.scheduled_at is None and attempt.number == 1:
            self.scheduled_at = attempt.started_at + queue_s

    @property
    def resume_prompt(self) -> list[int]:
        """Prompt plus every token already sent: what the next attempt prefills."""
        return [*self.request.prompt_token_ids, *self.produced]

    @property
    def resume_params(self) -> SamplingParams:
        """The sampling params for what is left to generate."""
        left = self.request.sampling.max_tokens - len(self.produced)
        return dataclasses.replace(self.request.sampling, max_tokens=max(1, left))

    def usage(self) -> Usage:
        """Token counts for the final delta."""
        return Usage(
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=len(self.produced),
            cached_tokens=max(self.cached_tokens, 0),
        )

    def emit(self, processor: OutputProcessor, out: CoreOutput) -> bool:
        """Detokenize and queue a worker's output as is; True when the request ended (a stop
        string included). `produced` is the one list of tokens sent, across attempts."""
        self.produced.extend(out.new_token_ids)
        ended = False
        ro = processor.process_output(self.request_id, out)
        if ro is not None:
            final = ro.finish_reason if ro.finished else None
            usage = self.usage() if ro.finished else None
            lps: tuple[TokenLogprobs | None, ...] = ()
            if self.request.sampling.logprobs is not None:  # one per token, None where unknown
                lps = tuple(ro.logprobs)
                if len(lps) != len(ro.token_ids):
                    lps = tuple(None for _ in ro.token_ids)
            delta = TokenDelta(tuple(ro.token_ids), ro.text, final, usage, lps, self.scheduled_at)
            self.queue.put_nowait(delta)
            ended = ro.finished
        if ended:
            self.done = True
        return ended

    def fail(self, error: BaseException) -> None:
        """End the stream with an error (the router maps it to a status)."""
        if not self.done:
            self.done = True
            self.queue.put_nowait(error)

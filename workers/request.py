"""One request's state inside an engine core (plain Python: the scheduler and simulator share it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from batonserve.workers.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"  # queued (new or preempted); holds no blocks
    RUNNING = "running"  # in the continuous batch; holds blocks
    PREFILLED = "prefilled"  # prefill_only: first token sampled, blocks pinned until release()
    IMPORTING = "importing"  # KV arriving from another engine; blocks held, not scheduled
    FINISHED = "finished"  # done; blocks freed


@dataclass
class Request:
    """Token-level state of one request: what has been computed, what is cached, which blocks."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int = 0  # 0 means no limit beyond max_tokens
    prefill_only: bool = False
    arrival: int = 0  # admission order, for FCFS
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks, in order
    num_computed_tokens: int = 0  # tokens whose KV is written in block_ids
    # Tokens sampled in steps whose results are not back yet (async scheduling; always 0 in
    # lockstep): the scheduler may already run the next one, its input filled in at run time.
    num_pending: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 until then
    num_preemptions: int = 0
    ready_step: int = 0  # scheduler step its next token became ready (token regrouping)
    finish_reason: str | None = None  # "stop", "length" or "abort"

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length."""
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt plus generated tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        """Token id at absolute position i."""
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def tokens_between(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        """True once the request has ended (stop, length or abort)."""
        return self.status is RequestStatus.FINISHED

    def check_stop(self) -> str | None:
        """Finish reason after the latest token, or None to keep going (stop strings: not here)."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        if last in self.params.stop_token_ids:
            return "stop"
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return "stop"
        if len(self.output_token_ids) >= self.params.max_tokens:
            return "length"
        if self.max_model_len and self.num_tokens >= self.max_model_len:
            return "length"
        return None

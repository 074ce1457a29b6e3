"""The `sequence_parallel` config section: when a prompt goes to a ring group, and how big a one."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from batonserve.workers.parallel.schedules import SCHEDULES
from batonserve.workers.plugins import choices

SPLayoutName = Literal["zigzag", "striped"]
# "auto": the cost model picks one of the registered schedules per request.
SP_SCHEDULE_CHOICES = ("auto", *SCHEDULES)


@dataclass(frozen=True)
class SequenceParallelConfig:
    """Long prompts are prefilled by a group of prefill workers (Ring Attention / TokenRing)."""

    enabled: bool = False
    threshold_tokens: int = 4096  # prompts at least this long go to a ring group
    tokens_per_rank: int = 2048  # N = min(group size, ceil(len / tokens_per_rank)), at least 2
    max_group_size: int = 4  # members taken from the prefill pool (at most its replicas)
    schedule: str = field(default="auto", metadata=choices(SP_SCHEDULE_CHOICES))
    layout: SPLayoutName = "zigzag"
    timeout_s: float = 60.0  # a dead peer raises within this (no hang)

    def __post_init__(self) -> None:
        for name in ("threshold_tokens", "tokens_per_rank"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"sequence_parallel.{name}: must be >= 1, got {getattr(self, name)}"
                )
        if self.max_group_size < 2:
            raise ValueError(
                f"sequence_parallel.max_group_size: must be >= 2, got {self.max_group_size}"
            )
        if self.schedule not in SP_SCHEDULE_CHOICES:
            raise ValueError(f"sequence_parallel.schedule: unknown {self.schedule!r}")
        if self.layout not in get_args(SPLayoutName):
            raise ValueError(f"sequence_parallel.layout: unknown {self.layout!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"sequence_parallel.timeout_s: must be > 0, got {self.timeout_s}")

    def group_size(self, prompt_len: int, available: int) -> int:
        """Ring size N for a prompt, or 0 when it takes the normal path (short, or no ring)."""
        if not self.enabled or prompt_len < self.threshold_tokens or available < 2:
            return 0
        want = math.ceil(prompt_len / self.tokens_per_rank)
        return max(2, min(available, self.max_group_size, want))

"""Token regrouping (ExpertFlow): pick the next batch from waiting tokens so it shares experts.

Plain Python like the scheduler that calls it. Each waiting token carries its forecast routing
path (the (layer, expert) pairs the predictor expects it to use in every MoE layer). A batch
takes every token that has waited `max_wait_steps` steps, so no token ever waits longer (the batch
then grows past `batch_size` if that many are due), then greedily adds the token that brings the
fewest experts not yet in the batch (oldest first among equals) until `batch_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# (layer, expert); expert_store.ExpertKey is one.
ExpertPath = frozenset[tuple[int, int]]


@dataclass(frozen=True)
class RegroupConfig:
    """Batch size and the wait bound (in scheduling steps)."""

    batch_size: int
    max_wait_steps: int
    by_experts: bool = True  # False: oldest first (the baseline regrouping is measured against)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_wait_steps < 0:
            raise ValueError(f"max_wait_steps: must be >= 0, got {self.max_wait_steps}")


@dataclass(frozen=True)
class WaitingToken:
    """A request's next token, waiting to be scheduled."""

    request_id: str
    ready_step: int  # the step it became ready to run
    experts: ExpertPath  # forecast routing path over all layers


def select_batch(
    waiting: Sequence[WaitingToken], step: int, config: RegroupConfig
) -> list[WaitingToken]:
    """The tokens to run at `step`: every overdue one, then up to batch_size by expert overlap."""
    by_age = sorted(waiting, key=lambda t: (t.ready_step, t.request_id))
    batch = [t for t in by_age if step - t.ready_step >= config.max_wait_steps]
    chosen = {t.request_id for t in batch}
    union: set[tuple[int, int]] = set().union(*(t.experts for t in batch)) if batch else set()
    rest = [t for t in by_age if t.request_id not in chosen]
    while len(batch) < config.batch_size and rest:
        best = min(range(len(rest)), key=lambda i: (len(rest[i].experts - union), i))
        tok = rest.pop(best)
        batch.append(tok)
        union |= tok.experts
    return batch


def select_fifo(
    waiting: Sequence[WaitingToken], step: int, config: RegroupConfig
) -> list[WaitingToken]:
    """The baseline: the oldest batch_size tokens."""
    return sorted(waiting, key=lambda t: (t.ready_step, t.request_id))[: config.batch_size]


def select(waiting: Sequence[WaitingToken], step: int, config: RegroupConfig) -> list[WaitingToken]:
    """select_batch, or select_fifo when config.by_experts is False."""
    return (select_batch if config.by_experts else select_fifo)(waiting, step, config)

"""Typed objects from the cluster to a ring member: group setup and one ring prefill."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from batonserve.workers.parallel.layout import rank_positions
from batonserve.workers.worker_types import HandoffSpec


@dataclass(frozen=True)
class RingSetup:
    """Join (or rejoin) the ring's torch.distributed group; one per member and group epoch."""

    epoch: int  # bumps on every rebuild: jobs of an older epoch are skipped
    host: str  # the TCPStore (run by the controller on the head)
    port: int
    rank: int
    members: tuple[str, ...]  # worker names by group rank
    backend: str  # "gloo" on CPU, "nccl" on CUDA
    timeout_s: float
    schedule: str  # "auto" or a schedule name
    layout: str

    @property
    def world_size(self) -> int:
        """Members in the group."""
        return len(self.members)


@dataclass(frozen=True)
class RingJob:
    """One ring prefill: group ranks 0..size-1 each prefill their shard and hand their KV rows
    to handoff.dst; the leader (holder of the last position) samples the first token."""

    epoch: int
    seq: int  # members run jobs in this order (collectives must match on every rank)
    size: int
    leader: int
    handoff: HandoffSpec  # src = the leader's name


def last_position_rank(length: int, size: int, layout: str) -> int:
    """The group rank holding position length - 1 (it samples the first token)."""
    for r in range(size):
        pos = rank_positions(length, size, r, layout)
        if pos.numel() and int(pos[-1]) == length - 1:
            return r
    raise AssertionError("some rank holds the last position")


def contiguous_runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row_start, row_end, first_position) of each run of consecutive positions in `pos` [n]."""
    n = int(pos.shape[0])
    if n == 0:
        return []
    breaks = ((pos[1:] - pos[:-1]) != 1).nonzero()[:, 0] + 1
    edges = [0, *breaks.tolist(), n]
    return [(a, b, int(pos[a])) for a, b in itertools.pairwise(edges)]

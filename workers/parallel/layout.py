"""Which tokens of a batch each rank of a sequence-parallel group holds, by global position.

Layouts split each request's new (uncached) tokens over N ranks, for any length (no divisibility by N
or 2N; a request shorter than N leaves some ranks with none of its tokens):

- zigzag (default): 2N near-equal chunks, rank r holds chunks r and 2N-1-r, so every rank gets the
  same causal work (one early, cheap chunk and one late, expensive chunk);
- striped: token i goes to rank i % N (also balanced, finer grained);
- contiguous: N near-equal chunks in order (unbalanced under causal masking; a baseline).

A cached prefix's KV can be spread over the ranks (contiguous chunks: "spread") or all sit on
rank 0 ("rank0"). Positions are global within a request: the prefix holds 0..P-1, the new tokens
P..P+L-1, so causal masking by position is bottom-right alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

LayoutKind = Literal["zigzag", "striped", "contiguous"]
PrefixPlacement = Literal["spread", "rank0"]
LAYOUTS: tuple[str, ...] = get_args(LayoutKind)
PREFIX_PLACEMENTS: tuple[str, ...] = get_args(PrefixPlacement)


def split_even(length: int, parts: int) -> list[int]:
    """Sizes of `parts` near-equal chunks of `length` (the first length % parts get one more)."""
    base, extra = divmod(length, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _chunk(length: int, parts: int, index: int) -> torch.Tensor:
    """Positions [start, end) of chunk `index` of `split_even(length, parts)` as int64."""
    sizes = split_even(length, parts)
    start = sum(sizes[:index])
    return torch.arange(start, start + sizes[index], dtype=torch.long)


def rank_positions(length: int, world: int, rank: int, kind: str = "zigzag") -> torch.Tensor:
    """Ascending positions (0-based, within the new tokens) of a length-`length` request on `rank`."""
    if kind not in LAYOUTS:
        raise ValueError(f"layout={kind!r} is not one of {LAYOUTS}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank={rank} is outside a group of world_size={world}")
    if length < 0:
        raise ValueError(f"length={length} must be >= 0")
    if kind == "striped":
        return torch.arange(rank, max(rank, length), world, dtype=torch.long)
    if kind == "contiguous":
        return _chunk(length, world, rank)
    return torch.cat(
        [_chunk(length, 2 * world, rank), _chunk(length, 2 * world, 2 * world - 1 - rank)]
    )


def prefix_positions(cached: int, world: int, rank: int, placement: str = "spread") -> torch.Tensor:
    """Positions of the cached-prefix KV that `rank` holds."""
    if placement not in PREFIX_PLACEMENTS:
        raise ValueError(f"prefix_placement={placement!r} is not one of {PREFIX_PLACEMENTS}")
    if placement == "rank0":
        return torch.arange(cached if rank == 0 else 0, dtype=torch.long)
    return _chunk(cached, world, rank)


@dataclass(frozen=True)
class ShardSpec:
    """One rank's tokens: queries for its new tokens, and every KV row it holds (prefix + new).

    Rows of q are this rank's new tokens; rows of k/v are [its prefix rows..., its new rows...].
    """

    q_pos: torch.Tensor  # [n_q] int64 global position in its request (prefix counted)
    q_seq: torch.Tensor  # [n_q] int64 index of the request in the batch
    kv_pos: torch.Tensor  # [n_kv] int64
    kv_seq: torch.Tensor  # [n_kv] int64

    @property
    def num_q(self) -> int:
        """Query rows on this rank."""
        return int(self.q_pos.shape[0])

    @property
    def num_kv(self) -> int:
        """KV rows on this rank."""
        return int(self.kv_pos.shape[0])


@dataclass(frozen=True)
class RankShard:
    """A rank's ShardSpec plus where its rows come from in the flat batch."""

    spec: ShardSpec
    new_rows: (
        torch.Tensor
    )  # [n_q] int64 rows in the flat batch of new tokens (concatenated requests)
    prefix_rows: torch.Tensor  # [n_prefix] int64 rows in the flat batch of cached-prefix tokens


def shard_batch(
    new_lens: list[int],
    cached_lens: list[int] | None,
    world: int,
    rank: int,
    *,
    layout: str = "zigzag",
    prefix_placement: str = "spread",
) -> RankShard:
    """Rank `rank`'s shard of a batch of requests with `new_lens` new and `cached_lens` cached tokens."""
    cached = cached_lens if cached_lens is not None else [0] * len(new_lens)
    if len(cached) != len(new_lens):
        raise ValueError(f"cached_lens has {len(cached)} entries for {len(new_lens)} requests")
    q_pos, q_seq, new_rows, p_pos, p_seq, p_rows = [], [], [], [], [], []
    new_off = pre_off = 0
    for s, (n, c) in enumerate(zip(new_lens, cached, strict=True)):
        if n < 0 or c < 0:
            raise ValueError(f"request {s}: new_lens={n} and cached_lens={c} must be >= 0")
        local = rank_positions(n, world, rank, layout)
        q_pos.append(local + c)
        q_seq.append(torch.full_like(local, s))
        new_rows.append(local + new_off)
        pre = prefix_positions(c, world, rank, prefix_placement)
        p_pos.append(pre)
        p_seq.append(torch.full_like(pre, s))
        p_rows.append(pre + pre_off)
        new_off += n
        pre_off += c
    empty = torch.zeros(0, dtype=torch.long)

    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate, or an empty int64 vector for an empty batch."""
        return torch.cat(xs) if xs else empty

    spec = ShardSpec(
        cat(q_pos),
        cat(q_seq),
        torch.cat([cat(p_pos), cat(q_pos)]),
        torch.cat([cat(p_seq), cat(q_seq)]),
    )
    return RankShard(spec, cat(new_rows), cat(p_rows))


def max_local_tokens(length: int, world: int, kind: str = "zigzag") -> int:
    """The most new tokens any rank holds for one request of `length` tokens."""
    return max(int(rank_positions(length, world, r, kind).shape[0]) for r in range(world))


def longest_prompt(budget_tokens: int, world: int, kind: str = "zigzag") -> int:
    """Longest prompt whose per-rank KV fits `budget_tokens` rows on every rank (= N * budget)."""
    if budget_tokens < 0:
        raise ValueError(f"budget_tokens={budget_tokens} must be >= 0")
    # max_local_tokens is ceil-like in length and exact at world * budget: search just above it.
    best = 0
    for length in range(world * budget_tokens, world * budget_tokens + 2 * world + 1):
        if max_local_tokens(length, world, kind) <= budget_tokens:
            best = length
    return best

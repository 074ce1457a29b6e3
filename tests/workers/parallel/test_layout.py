"""Layouts: every token on exactly one rank for any length, zigzag balance, memory budget."""

from __future__ import annotations

import pytest
import torch

from batonserve.workers.parallel.layout import (
    LAYOUTS,
    longest_prompt,
    max_local_tokens,
    rank_positions,
    shard_batch,
)


def _causal_work(pos: torch.Tensor) -> int:
    """Causal (query, key) pairs of queries at `pos` over the whole sequence: sum(p + 1)."""
    return int((pos + 1).sum())


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
def test_every_token_exactly_once_any_length(kind: str, world: int) -> None:
    """Lengths 0..70 and 2999, including lengths below N: a partition, ascending per rank."""
    for length in [*range(71), 2999]:
        parts = [rank_positions(length, world, r, kind) for r in range(world)]
        for p in parts:
            assert bool((p[1:] > p[:-1]).all())
        assert sorted(torch.cat(parts).tolist()) == list(range(length))
        sizes = [p.numel() for p in parts]
        assert max(sizes) - min(sizes) <= 2  # near-equal token counts (zigzag: two chunks)


def test_lengths_below_n_leave_ranks_empty() -> None:
    """A 2-token request over 4 ranks: two ranks hold nothing and that is fine."""
    for kind in LAYOUTS:
        sizes = [rank_positions(2, 4, r, kind).numel() for r in range(4)]
        assert sorted(sizes) == [0, 0, 1, 1]


def test_zigzag_balances_causal_work_contiguous_does_not() -> None:
    """Zigzag's per-rank causal work is within 1% of the mean; contiguous is ~(2N-1)/N off."""
    length, world = 4096, 4
    work = {
        k: [_causal_work(rank_positions(length, world, r, k)) for r in range(world)]
        for k in LAYOUTS
    }
    for kind in ("zigzag", "striped"):
        assert max(work[kind]) / min(work[kind]) < 1.01, kind
    assert max(work["contiguous"]) / min(work["contiguous"]) > 5.0


def test_shard_batch_prefix_and_positions() -> None:
    """Global positions count the cached prefix; rank0 placement puts all prefix KV on rank 0."""
    new, cached = [5, 3], [4, 2]
    for placement in ("spread", "rank0"):
        shards = [shard_batch(new, cached, 3, r, prefix_placement=placement) for r in range(3)]
        q_rows = sorted(i for s in shards for i in s.new_rows.tolist())
        assert q_rows == list(range(8))
        pre_rows = sorted(i for s in shards for i in s.prefix_rows.tolist())
        assert pre_rows == list(range(6))
        for s in shards:
            sp = s.spec
            # Query i of request 0 stands at position 4 + i, of request 1 at 2 + i.
            off = torch.tensor(cached)[sp.q_seq]
            starts = torch.tensor([0, 5])[sp.q_seq]
            assert torch.equal(sp.q_pos, s.new_rows - starts + off)
            assert sp.num_kv == s.prefix_rows.numel() + sp.num_q
        if placement == "rank0":
            assert shards[0].prefix_rows.numel() == 6 and shards[1].prefix_rows.numel() == 0


def test_bad_arguments_name_the_field() -> None:
    """User errors raise ValueError naming the bad field."""
    with pytest.raises(ValueError, match="layout"):
        rank_positions(4, 2, 0, "spiral")
    with pytest.raises(ValueError, match="rank"):
        rank_positions(4, 2, 2)
    with pytest.raises(ValueError, match="prefix_placement"):
        shard_batch([3], [2], 2, 0, prefix_placement="rank7")
    with pytest.raises(ValueError, match="cached_lens"):
        shard_batch([3], [2, 1], 2, 0)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_longest_prompt_grows_linearly_with_n(kind: str) -> None:
    """Under a fixed per-rank budget of B KV rows the longest prompt is exactly N * B."""
    for budget in (1, 7, 512, 1000):
        for world in (1, 2, 3, 4, 8):
            longest = longest_prompt(budget, world, kind)
            assert longest == world * budget
            assert max_local_tokens(longest, world, kind) <= budget
            assert max_local_tokens(longest + 1, world, kind) > budget

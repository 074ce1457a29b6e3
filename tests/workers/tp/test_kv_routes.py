"""head_routes, exhaustively for TP sizes 1..4 on both sides and 1..8 KV heads: every receiving
rank gets each head it holds exactly once, from a rank that holds it, and nothing else."""

from __future__ import annotations

import itertools

import pytest

from batonserve.workers.tp.kv_routes import HeadRoute, head_routes
from batonserve.workers.tp.shard import TPShard

SIZES = range(1, 5)
KV_HEADS = range(1, 9)


def _valid(num_kv: int, size: int) -> bool:
    return num_kv % size == 0 or size % num_kv == 0


CASES = [
    (kv, a, b)
    for kv, a, b in itertools.product(KV_HEADS, SIZES, SIZES)
    if _valid(kv, a) and _valid(kv, b)
]


def _heads(rank: int, size: int, num_kv: int) -> range:
    return range(*TPShard(rank, size).kv_heads(num_kv))


@pytest.mark.parametrize(("num_kv", "a", "b"), CASES)
def test_every_receiver_gets_its_heads_once_from_an_owner(num_kv: int, a: int, b: int) -> None:
    routes = head_routes(num_kv, a, b)
    got: dict[int, list[int]] = {j: [] for j in range(b)}
    for r in routes:
        assert 0 <= r.src < a and 0 <= r.dst < b and r.start < r.stop
        assert set(range(r.start, r.stop)) <= set(_heads(r.src, a, num_kv)), "sender owns it"
        got[r.dst] += range(r.start, r.stop)
    for j in range(b):
        assert got[j] == list(_heads(j, b, num_kv)), f"receiver {j}: each of its heads once"
    assert list(routes) == sorted(routes, key=lambda r: (r.dst, r.start))
    pairs = [(r.src, r.dst) for r in routes]
    assert len(pairs) == len(set(pairs)), "one contiguous range per (sender, receiver)"


@pytest.mark.parametrize(("num_kv", "a", "b"), CASES)
def test_a_head_copy_is_sent_once_per_receiver_and_replicas_share(
    num_kv: int, a: int, b: int
) -> None:
    routes = head_routes(num_kv, a, b)
    sent = [(h, r.dst) for r in routes for h in range(r.start, r.stop)]
    assert len(sent) == len(set(sent)) == sum(len(_heads(j, b, num_kv)) for j in range(b))
    # A head held by m senders and n receivers leaves min(m, n) of its holders: replicas share.
    holders = {(h, r.src) for r in routes for h in range(r.start, r.stop)}
    for h in range(num_kv):
        m = sum(h in _heads(i, a, num_kv) for i in range(a))
        n = sum(h in _heads(j, b, num_kv) for j in range(b))
        assert sum(x == h for x, _ in holders) == min(m, n)


@pytest.mark.parametrize(
    ("num_kv", "a"), [(kv, a) for kv in KV_HEADS for a in SIZES if _valid(kv, a)]
)
def test_equal_layouts_route_each_rank_to_itself(num_kv: int, a: int) -> None:
    routes = head_routes(num_kv, a, a)
    assert routes == tuple(HeadRoute(i, i, *TPShard(i, a).kv_heads(num_kv)) for i in range(a))


def test_examples() -> None:
    assert head_routes(8, 1, 1) == (HeadRoute(0, 0, 0, 8),)
    assert head_routes(4, 2, 1) == (HeadRoute(0, 0, 0, 2), HeadRoute(1, 0, 2, 4))
    assert head_routes(4, 1, 2) == (HeadRoute(0, 0, 0, 2), HeadRoute(0, 1, 2, 4))
    # One KV head on 4 prefill ranks, 2 decode ranks: two owners send, one copy each.
    assert head_routes(1, 4, 2) == (HeadRoute(0, 0, 0, 1), HeadRoute(1, 1, 0, 1))
    # 2 KV heads, TP=4 -> TP=1: one replica of each head sends (ranks 0 and 2).
    assert head_routes(2, 4, 1) == (HeadRoute(0, 0, 0, 1), HeadRoute(2, 0, 1, 2))


def test_sizes_that_cannot_split_the_heads_are_refused() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads"):
        head_routes(3, 2, 1)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        head_routes(6, 1, 4)

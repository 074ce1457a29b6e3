"""Cache policies: Belady is optimal (brute force on small cases), the others behave as specified."""

from __future__ import annotations

import functools
import random

import pytest
from moe_helpers import PROMPTS, ResidentRun, store_run

from batonserve.workers.expert_store import ExpertKey, PolicyContext, StoreConfig, make_policy
from batonserve.workers.expert_store.simulate import simulate

K = ExpertKey


def optimal_hits(seq: list[ExpertKey], capacity: int) -> int:
    """Most hits any demand policy (with bypass) can get: exhaustive search."""

    @functools.cache
    def best(i: int, cache: frozenset[ExpertKey]) -> int:
        if i == len(seq):
            return 0
        key = seq[i]
        if key in cache:
            return 1 + best(i + 1, cache)
        options = [best(i + 1, cache)]  # bypass
        if len(cache) < capacity:
            options.append(best(i + 1, cache | {key}))
        else:
            options += [best(i + 1, (cache - {v}) | {key}) for v in cache]
        return max(options)

    return best(0, frozenset())


def ctx_for(seq: list[ExpertKey]) -> PolicyContext:
    """A context over 2 layers x 4 experts."""
    return PolicyContext(2, 4, popularity=((4, 3, 2, 1), (1, 2, 3, 4)), future=tuple(seq))


def test_belady_hand_case() -> None:
    """A B C A B C with room for 2: LRU never hits, Belady keeps A and hits twice."""
    a, b, c = K(0, 0), K(0, 1), K(0, 2)
    seq = [a, b, c, a, b, c]
    assert simulate(seq, 2, "lru", ctx_for(seq)).hits == 0
    assert simulate(seq, 2, "belady", ctx_for(seq)).hits == optimal_hits(seq, 2) == 2


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_optimal_on_random_small_traces(seed: int) -> None:
    """Belady's hits equal the exhaustive optimum; no other policy beats it."""
    rng = random.Random(seed)
    keys = [K(layer, e) for layer in range(2) for e in range(3)]
    seq = [rng.choice(keys) for _ in range(12)]
    for cap in (1, 2, 3):
        ctx = ctx_for(seq)
        opt = optimal_hits(seq, cap)
        assert simulate(seq, cap, "belady", ctx).hits == opt
        for other in ("lru", "popularity"):
            assert simulate(seq, cap, other, ctx).hits <= opt


def test_popularity_keeps_the_popular_set() -> None:
    """An unpopular miss does not displace a more popular resident expert."""
    seq = [K(0, 0), K(0, 1), K(0, 3), K(0, 0), K(0, 1)]
    assert simulate(seq, 2, "popularity", ctx_for(seq)).hits == 2


def test_predictive_evicts_unforecast_first_and_guards_prefetch() -> None:
    """Victim = furthest forecast (unforecast first); a prefetch cannot push out a nearer use."""
    pol = make_policy("predictive", ctx_for([]))
    a, b, c = K(1, 0), K(1, 1), K(1, 2)
    for i, k in enumerate((a, b, c)):
        pol.on_insert(k, i)
    pol.advance(4)
    pol.forecast(5, [a])
    pol.forecast(7, [b])
    assert pol.victim({a, b, c}, 3) == c  # no forecast
    assert pol.victim({a, b}, 3) == b  # forecast later
    assert not pol.admit(K(1, 3), a, 3, prefetch=True)  # K(1,3) has no forecast
    pol.forecast(6, [K(1, 3)])
    assert pol.admit(K(1, 3), b, 3, prefetch=True)
    assert pol.admit(K(1, 3), b, 3, prefetch=False)  # demand: next use by tick 4 + 2 < 7
    assert not pol.admit(K(1, 3), a, 3, prefetch=False)  # a is forecast sooner (tick 5)
    pol.advance(6)  # tick 5 passed: a's forecast is stale
    assert pol.predicted_use(a) == float("inf")


def test_unknown_policy_is_a_clear_error() -> None:
    """The registry names the bad value and the known ones."""
    with pytest.raises(ValueError, match="policy: unknown cache policy 'fifo'"):
        make_policy("fifo", ctx_for([]))
    with pytest.raises(ValueError, match="belady"):
        make_policy("belady", PolicyContext(1, 1))


@pytest.mark.parametrize("policy", ["lru", "popularity", "belady"])
def test_store_matches_offline_replay(reference: ResidentRun, policy: str) -> None:
    """Without prefetch the live store hits exactly as the offline replay of its trace."""
    cap = 10
    cfg = StoreConfig(fast_budget_bytes=cap * 3 * 256 * 64 * 2, policy=policy)
    _, store = store_run(reference, PROMPTS, cfg)
    sim = simulate(reference.demands, cap, policy, reference.ctx, group_ends=reference.group_ends)
    assert sum(map(sum, store.stats.expert_hits)) == sim.hits

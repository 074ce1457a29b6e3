"""Token regrouping: fewer distinct experts per batch, and no token waits past the bound."""

from __future__ import annotations

import random

import pytest

from batonserve.workers.expert_store import ExpertKey
from batonserve.workers.regroup import RegroupConfig, WaitingToken, select_batch, select_fifo


def simulate(select, n_req: int, steps: int, cfg: RegroupConfig, seed: int):  # type: ignore[no-untyped-def]
    """Requests whose tokens come back one step after running; returns (distinct/batch, max wait)."""
    rng = random.Random(seed)
    # two "topics": requests of a topic route to the same few experts
    paths = [
        frozenset(ExpertKey(layer, (r % 2) * 4 + rng.randrange(4)) for layer in range(4))
        for r in range(n_req)
    ]
    waiting = {f"r{i}": WaitingToken(f"r{i}", 0, paths[i]) for i in range(n_req)}
    distinct: list[int] = []
    worst = 0
    for step in range(steps):
        batch = select(list(waiting.values()), step, cfg)
        assert len(batch) <= cfg.batch_size
        assert len({t.request_id for t in batch}) == len(batch)
        distinct.append(len(set().union(*(t.experts for t in batch))))
        for t in batch:
            worst = max(worst, step - t.ready_step)
            new_path = frozenset(
                ExpertKey(k.layer, (k.expert + rng.choice((0, 0, 1))) % 8) for k in t.experts
            )
            waiting[t.request_id] = WaitingToken(t.request_id, step + 1, new_path)
    return sum(distinct) / len(distinct), worst


@pytest.mark.parametrize("seed", range(4))
def test_regrouping_bounds_wait_and_shares_experts(seed: int) -> None:
    """Within the bound, regrouped batches activate fewer experts than FIFO ones."""
    cfg = RegroupConfig(batch_size=4, max_wait_steps=3)
    grouped, worst = simulate(select_batch, 12, 200, cfg, seed)
    fifo, _fifo_worst = simulate(select_fifo, 12, 200, cfg, seed)
    assert worst <= cfg.max_wait_steps
    assert grouped < fifo


def test_overdue_tokens_go_first() -> None:
    """A token at the wait bound is scheduled even if it shares nothing."""
    a = frozenset({ExpertKey(0, 0)})
    b = frozenset({ExpertKey(0, 9)})
    waiting = [WaitingToken("old", 0, b)] + [WaitingToken(f"n{i}", 5, a) for i in range(3)]
    batch = select_batch(waiting, 5, RegroupConfig(batch_size=2, max_wait_steps=5))
    assert batch[0].request_id == "old"


def test_config_errors_name_the_field() -> None:
    """Bad config values raise ValueError naming the field."""
    with pytest.raises(ValueError, match="batch_size"):
        RegroupConfig(batch_size=0, max_wait_steps=1)
    with pytest.raises(ValueError, match="max_wait_steps"):
        RegroupConfig(batch_size=1, max_wait_steps=-1)

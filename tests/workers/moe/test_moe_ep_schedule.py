"""The expert-parallel round schedule: every row once, caps respected, both sides agree."""

from __future__ import annotations

import math

import pytest
import torch

from batonserve.workers.parallel.ep_schedule import EPShape, plan_rounds
from batonserve.workers.parallel.ep_tuner import EPSettings, EPTuner, bucket_of


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize(("overlap", "cf"), [(1, 0.0), (2, 0.0), (3, 1.0), (1, 0.5), (4, 2.0)])
def test_rounds_cover_rows_once_and_agree(world: int, overlap: int, cf: float) -> None:
    """Sender and receiver views match; every row is sent exactly once; caps hold."""
    g = torch.Generator().manual_seed(world * 10 + overlap)
    e = 8
    counts = torch.randint(0, 9, (world, e), generator=g)
    counts[0] = 0  # an empty rank
    plans = [plan_rounds(EPShape(world, r, e), counts, overlap, cf) for r in range(world)]
    n_rounds = len(plans[0])
    assert all(len(p) == n_rounds for p in plans)  # same collective sequence on every rank
    for r in range(world):
        sent = torch.cat([p.send_index for p in plans[r]]).sort().values
        assert torch.equal(sent, torch.arange(int(counts[r].sum())))
    for i in range(n_rounds):
        for src in range(world):
            for dst in range(world):
                assert plans[src][i].send_counts[dst] == plans[dst][i].recv_counts[src]
        for r in range(world):
            p = plans[r][i]
            assert sorted(p.recv_to_expert.tolist()) == list(range(sum(p.recv_counts)))
            if cf > 0:
                cap = max(math.ceil(cf * int(counts.sum(1).max()) / e), 1)
                assert all(n <= cap * world for n in p.expert_counts)


def test_bad_settings_are_clear_errors() -> None:
    """Field names in the messages."""
    with pytest.raises(ValueError, match="expert_parallel_size"):
        EPShape(3, 0, 8)
    with pytest.raises(ValueError, match="overlap"):
        EPSettings(overlap=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        plan_rounds(EPShape(1, 0, 4), torch.zeros(1, 4, dtype=torch.int64), 1, -1.0)


def test_tuner_explores_then_keeps_fastest_with_hysteresis() -> None:
    """Picks the fastest; ignores a 2% wobble; switches on a real 30% change."""
    a, b, c = EPSettings(1), EPSettings(2), EPSettings(4)
    speed = {a: 1.0, b: 0.8, c: 0.9}
    tuner = EPTuner([a, b, c], samples_per_candidate=2, hysteresis=0.05, probe_every=4)
    for _ in range(30):
        s = tuner.choose(100)
        tuner.observe(speed[s])
    bs = tuner.stats.buckets[bucket_of(100)]
    assert bs.current == b and bs.switches == 0
    speed[c] = 0.79  # within hysteresis of b: no switch
    for _ in range(40):
        tuner.observe(speed[tuner.choose(100)])
    assert tuner.stats.buckets[bucket_of(100)].current == b
    speed[c] = 0.5  # clearly faster now
    for _ in range(60):
        tuner.observe(speed[tuner.choose(100)])
    bs = tuner.stats.buckets[bucket_of(100)]
    assert bs.current == c and bs.switches == 1
    assert [d.reason for d in tuner.stats.decisions] == ["explored", "switch"]
    assert bucket_of(100) != bucket_of(1000)  # buckets are tuned separately

"""Engine core under random load on the fake runner: chunking, prefix hits and preemption together.

The fake runner's logits are a function of the context it reads back through the block tables, so
any wrong block table, slot, cached block or recompute shows up as a wrong token.
"""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner, reference_greedy

from batonserve.workers.engine_core import EngineCore
from batonserve.workers.request import Request
from batonserve.workers.sampling_params import SamplingParams


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    runner = FakeRunner(num_blocks=rng.choice([12, 20, 64]), block_size=rng.choice([2, 4]))
    core = EngineCore(
        runner,
        max_num_batched_tokens=rng.choice([3, 8, 64]),
        max_num_seqs=rng.choice([2, 4, 16]),
        enable_prefix_caching=rng.random() < 0.8,
    )
    shared = [rng.randrange(2, 64) for _ in range(12)]  # common prefix: prefix-cache hits
    expected: dict[str, list[int]] = {}
    got: dict[str, list[int]] = {}
    pending = list(range(10))
    for _step in range(2000):
        if pending and rng.random() < 0.3:  # requests arrive while others run
            i = pending.pop(0)
            prompt = shared[: rng.randrange(0, 12)] + [
                rng.randrange(2, 64) for _ in range(rng.randrange(1, 10))
            ]
            n = rng.randrange(1, 12)
            rid = f"r{i}"
            expected[rid] = reference_greedy(runner, prompt, n)
            got[rid] = []
            core.add_request(
                Request(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            )
        if not core.has_unfinished() and not pending:
            break
        for out in core.step():
            got[out.request_id] += out.new_token_ids
    assert not pending and not core.has_unfinished()
    assert got == expected
    assert core.pool.usage == 0.0

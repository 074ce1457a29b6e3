"""Engine core under random load on the fake runner: chunking, prefix hits and preemption together.

The fake runner's logits are a function of the context it reads back through the block tables, so
any wrong block table, slot, cached block or recompute shows up as a wrong token.
"""

from __future__ import annotations

import random

from fake_runner import FakeRunner, reference_greedy

from batonserve.workers.engine_core import EngineCore
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import SchedulerStats


def test_random_workloads_match_reference() -> None:
    preemptions = hits = 0
    for seed in range(8):
        stats = _run_workload(seed)
        preemptions += stats.num_preemptions
        hits += stats.prefix_hits
    assert preemptions > 0 and hits > 0  # the mix really exercises both


def _run_workload(seed: int) -> SchedulerStats:
    rng = random.Random(seed)
    # 16 blocks of 2 hold the longest request (21 + 11 tokens) alone; fewer would cut it short.
    runner = FakeRunner(num_blocks=rng.choice([16, 24, 64]), block_size=rng.choice([2, 4]))
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
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            core.add_request(rid, prompt, params)
        if not core.has_unfinished() and not pending:
            break
        for out in core.step():
            got[out.request_id] += out.new_token_ids
    assert not pending and not core.has_unfinished()
    assert got == expected, f"seed {seed}"
    assert core.pool.usage == 0.0
    return core.stats()

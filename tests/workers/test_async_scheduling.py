"""Async scheduling: the engine core plans step k+1 while the model runs step k.

Randomized, seeded workloads on the fake runner (its logits are a function of the context read
back through the block tables, so a pending token filled into the wrong row, a block freed under a
running step, or a token applied to the wrong request shows up as a wrong token). Requests arrive
while others run, stop on EOS or a stop token or by length, sample greedily or with a seed, share
prefixes, get preempted, aborted, and their ids reused; every request's tokens must equal what it
makes alone, and the pool must end empty.
"""

from __future__ import annotations

import random

import pytest
from fake_runner import FakeRunner

from batonserve.workers.engine_core import EngineCore
from batonserve.workers.sampler import Sampler
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import PENDING_TOKEN, StepPlan


def alone(runner: FakeRunner, prompt: list[int], params: SamplingParams) -> list[int]:
    """The tokens a request makes on its own (greedy or seeded: a pure function of context)."""
    sampler = Sampler()
    ctx, out = list(prompt), []
    while len(out) < params.max_tokens:
        logits = runner.logits_for(ctx)[None]
        tok = sampler.sample(logits, [params], [len(ctx)]).token_ids[0]
        out.append(tok)
        ctx.append(tok)
        if tok in params.stop_token_ids or (not params.ignore_eos and tok == 1):
            break
    return out


def run_workload(seed: int, async_scheduling: bool) -> tuple[EngineCore, dict[str, int]]:
    rng = random.Random(seed)
    runner = FakeRunner(num_blocks=rng.choice([16, 24, 64]), block_size=rng.choice([2, 4]))
    core = EngineCore(
        runner,
        max_num_batched_tokens=rng.choice([3, 8, 64]),
        max_num_seqs=rng.choice([2, 4, 16]),
        enable_prefix_caching=rng.random() < 0.8,
        async_scheduling=async_scheduling,
    )
    advance = core.scheduler.advance
    counts = {"aborts": 0, "reused": 0, "stopped": 0, "ran_ahead": 0}

    def counting_advance(plan: StepPlan) -> None:
        counts["ran_ahead"] += sum(s.token_ids[0] == PENDING_TOKEN for s in plan.seqs)
        advance(plan)

    core.scheduler.advance = counting_advance  # type: ignore[method-assign]
    shared = [rng.randrange(2, 64) for _ in range(12)]
    want: dict[str, list[int]] = {}  # by request (ids are reused: keyed by a generation)
    got: dict[str, list[int]] = {}
    live: dict[str, str] = {}  # request id -> its current generation key
    aborted: set[str] = set()
    arrivals = 14
    for _step in range(3000):
        if arrivals and rng.random() < 0.3:
            arrivals -= 1
            rid = f"r{rng.randrange(8)}"
            if rid in live:
                rid = f"r{8 + arrivals}"
            elif any(k.startswith(rid + "#") for k in want):
                counts["reused"] += 1
            prompt = shared[: rng.randrange(0, 12)] + [
                rng.randrange(2, 64) for _ in range(rng.randrange(1, 10))
            ]
            params = SamplingParams(
                max_tokens=rng.randrange(1, 12),
                temperature=rng.choice([0.0, 0.8]),
                seed=rng.randrange(1000),
                ignore_eos=rng.random() < 0.5,
                stop_token_ids=tuple(rng.sample(range(2, 64), rng.choice([0, 3]))),
            )
            key = f"{rid}#{len(want)}"
            want[key] = alone(runner, prompt, params)
            got[key] = []
            live[rid] = key
            core.add_request(rid, prompt, params)
        if live and rng.random() < 0.03:  # a client leaves at a random moment
            rid = rng.choice(sorted(live))
            core.abort_request(rid)
            aborted.add(live.pop(rid))
            counts["aborts"] += 1
        if not core.has_unfinished() and not arrivals:
            break
        for out in core.step():
            key = live.get(out.request_id)
            if key is None:
                continue  # a late output of an aborted request: nobody listens any more
            got[key] += out.new_token_ids
            if out.finished:
                counts["stopped"] += out.finish_reason == "stop"
                del live[out.request_id]
    core.settle()
    assert not arrivals and not live and not core.has_unfinished(), f"seed {seed}"
    for key, tokens in want.items():
        if key in aborted:
            assert got[key] == tokens[: len(got[key])], f"seed {seed}: {key} (aborted)"
        else:
            assert got[key] == tokens, f"seed {seed}: {key}"
    assert core.pool.usage == 0.0, f"seed {seed}: blocks left held"
    stats = core.stats()
    counts["preemptions"] = stats.num_preemptions
    counts["hits"] = stats.prefix_hits
    assert all(int(b.input_ids.min()) >= 0 for b in runner.batches)  # pending ones filled in
    return core, counts


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_random_workloads_match_each_request_alone(async_scheduling: bool) -> None:
    totals: dict[str, int] = {}
    for seed in range(12):
        _, counts = run_workload(seed, async_scheduling)
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    # The mix really exercises every path.
    for k in ("aborts", "reused", "stopped", "preemptions", "hits"):
        assert totals[k] > 0, (k, totals)
    assert (totals["ran_ahead"] > 0) == async_scheduling, totals


def test_the_next_step_is_planned_while_the_model_runs() -> None:
    """With async scheduling, step k+1's decode is planned before step k's token exists: its
    input is filled in on the step thread, and the result equals lockstep's."""
    runner = FakeRunner(num_blocks=32, block_size=4)
    planned: list[list[int]] = []
    core = EngineCore(runner, async_scheduling=True)
    schedule = core.scheduler.schedule

    def spy():  # type: ignore[no-untyped-def]
        plan = schedule()
        planned.append([t for s in plan.seqs for t in s.token_ids])
        return plan

    core.scheduler.schedule = spy  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    core.add_request("a", [5, 6, 7], params)
    first = core.step()
    assert first == []  # the first call only starts the prefill
    tokens: list[int] = []
    while core.has_unfinished():
        for out in core.step():
            tokens += out.new_token_ids
    assert tokens == alone(runner, [5, 6, 7], params)
    assert [-1] in planned  # a decode planned on a pending token
    assert all(int(b.input_ids.min()) >= 0 for b in runner.batches)  # every one filled in
    # No wasted step: the last token's decode is never planned (max_tokens is known).
    assert len(runner.batches) == 6


def test_a_layer_hook_step_settles_the_running_one_first() -> None:
    runner = FakeRunner(num_blocks=32, block_size=4)
    core = EngineCore(runner, async_scheduling=True)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    core.add_request("a", [5, 6, 7], params)
    tokens: list[int] = []
    calls = 0
    while core.has_unfinished():
        hook = (lambda layer, plan: None) if calls % 2 else None
        calls += 1
        for out in core.step(hook):
            tokens += out.new_token_ids
    core.settle()
    assert tokens == alone(runner, [5, 6, 7], params)
    assert core.pool.usage == 0.0

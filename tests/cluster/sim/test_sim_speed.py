"""The simulator's shortcuts change nothing but its speed: counting pool, cached views, early stop."""

from __future__ import annotations

import dataclasses

import pytest
from sim_helpers import LLAMA, splitwise_perf

from batonserve.cluster.sim import simulator as simulator_mod
from batonserve.cluster.sim import worker as worker_mod
from batonserve.cluster.sim.count_pool import CountingBlockPool
from batonserve.cluster.sim.design import make_design
from batonserve.cluster.sim.hardware import DEFAULT_MACHINES
from batonserve.cluster.sim.metrics import Reference, SLOTable
from batonserve.cluster.sim.planner import PlanSetup, evaluate
from batonserve.cluster.sim.simulator import Simulator
from batonserve.cluster.sim.trace import load_azure_trace, retime_poisson
from batonserve.workers.block_pool import BlockPool


@pytest.fixture(scope="module")
def setup() -> PlanSetup:
    perf = splitwise_perf()
    trace = load_azure_trace("code", limit=150)
    return PlanSetup(LLAMA, DEFAULT_MACHINES, perf, Reference(perf["a100-80gb"]), trace)


def _run(setup: PlanSetup, family: str, p: int, d: int, rate: float) -> list[tuple]:
    trace = retime_poisson(setup.requests, rate, 0)
    res = Simulator(make_design(family, p, d), LLAMA, DEFAULT_MACHINES, setup.perf).run(trace)
    return [dataclasses.astuple(r) for r in res.records]


def test_counting_pool_hands_out_what_block_pool_does() -> None:
    fast, ref = CountingBlockPool(10, 16), BlockPool(10, 16, enable_caching=False)
    a, b = fast.allocate(4), ref.allocate(4)
    assert a is not None and b is not None and len(a) == len(b) == 4
    assert fast.allocate(7) is None and ref.allocate(7) is None
    fast.free(a)
    ref.free(b)
    assert fast.num_free_blocks == ref.num_free_blocks == 10 and fast.usage == ref.usage == 0.0
    with pytest.raises(AssertionError):
        fast.free([0])  # every block is already free


def test_counting_pool_runs_equal_block_pool_runs(
    setup: PlanSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = _run(setup, "Splitwise-HA", 2, 1, 6.0) + _run(setup, "Baseline-A", 2, 0, 3.0)
    monkeypatch.setattr(
        worker_mod, "CountingBlockPool", lambda n, bs: BlockPool(n, bs, enable_caching=False)
    )
    slow = _run(setup, "Splitwise-HA", 2, 1, 6.0) + _run(setup, "Baseline-A", 2, 0, 3.0)
    assert fast == slow


def test_cached_views_equal_fresh_ones(setup: PlanSetup, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    arrive = simulator_mod.Simulator._arrive

    def checking_arrive(self: Simulator, r: object) -> None:
        nonlocal checked
        for w in self.workers.values():
            cached = w.view()
            w._view = None  # rebuild from the scheduler's own stats
            st = w.sched.stats()
            fresh = w.view()
            assert cached == fresh
            assert fresh.pending_prefill_tokens == st.pending_prefill_tokens
            assert fresh.running == st.num_running + len(w.imports)
            checked += 1
        arrive(self, r)  # type: ignore[arg-type]

    monkeypatch.setattr(simulator_mod.Simulator, "_arrive", checking_arrive)
    _run(setup, "Splitwise-HH", 2, 1, 12.0)  # busy enough for the mixed pool to lend workers
    assert checked > 0


def test_stopping_early_keeps_every_verdict(setup: PlanSetup) -> None:
    design = make_design("Splitwise-HH", 1, 1)
    stopped = 0
    for rate in (1.0, 3.0, 6.0, 12.0, 40.0):
        full, _ = evaluate(setup, design, rate)
        early, res = evaluate(setup, design, rate, stop_early=True)
        assert early.slo_met == full.slo_met
        if res.stopped:
            stopped += 1
            assert not full.slo_met and any("stopped early" in v for v in early.slo_violations)
        else:
            assert early == full
    assert stopped >= 1
    strict = dataclasses.replace(setup, slo=SLOTable(ttft=(1.0, 1.0, 1.0)))
    early, res = evaluate(strict, design, 40.0, stop_early=True)
    assert not early.slo_met and res.stopped.startswith("ttft_p")

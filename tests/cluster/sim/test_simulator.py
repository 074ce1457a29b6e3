"""The simulator: conservation, event order, handoff timing, the scheduler's decisions."""

from __future__ import annotations

import dataclasses

import pytest
from sim_helpers import LLAMA, TOY, TOY_MACHINE, splitwise_perf

from batonserve.cluster.scheduling import (
    ClusterScheduler,
    MixedPoolConfig,
    Pairing,
    RequestView,
    SchedulerConfig,
)
from batonserve.cluster.sim.design import Design, PoolSpec, make_design
from batonserve.cluster.sim.hardware import DEFAULT_MACHINES, MachineSpec, transfer_seconds
from batonserve.cluster.sim.metrics import Reference, SLOTable, summarize
from batonserve.cluster.sim.perf_model import ConstantPerfModel
from batonserve.cluster.sim.simulator import SimConfig, Simulator
from batonserve.cluster.sim.trace import TraceRequest, load_azure_trace, retime_poisson


@pytest.fixture(scope="module")
def code_run():  # type: ignore[no-untyped-def]
    perf = splitwise_perf()
    trace = retime_poisson(load_azure_trace("code", limit=400), rate=12.0, seed=0)
    sim = Simulator(make_design("Splitwise-HA", 3, 2), LLAMA, DEFAULT_MACHINES, perf)
    return sim, sim.run(trace), perf


def test_every_request_finishes_exactly_once_with_all_its_tokens(code_run) -> None:  # type: ignore[no-untyped-def]
    sim, result, _ = code_run
    assert len(result.records) == 400
    for r in result.records:
        assert r.num_finishes == 1 and r.tokens_out == r.output_tokens
    # Nothing leaks: every block pool is back to all-free, nothing reserved or queued.
    for w in sim.workers.values():
        assert w.blocks.num_free_blocks == w.blocks.num_blocks
        assert not w.sched.requests and w.reserved_blocks == 0


def test_event_order_per_request(code_run) -> None:  # type: ignore[no-untyped-def]
    _, result, _ = code_run
    modes = {r.mode for r in result.records}
    assert modes == {"disaggregated", "in_place"}
    for r in result.records:
        assert r.arrival_s <= r.prefill_start_s <= r.first_token_s <= r.finish_s
        if r.mode == "disaggregated" and r.output_tokens > 1:
            # The first token is sampled on the prefill side, then the KV lands, then decode.
            assert r.first_token_s == r.prefill_end_s <= r.transfer_end_s <= r.finish_s
        else:
            assert (
                r.transfer_end_s < 0 and r.prefill_worker == r.decode_worker
            ) or r.output_tokens == 1


def test_short_prompts_are_prefilled_in_place(code_run) -> None:  # type: ignore[no-untyped-def]
    _, result, _ = code_run
    for r in result.records:
        if r.prompt_tokens <= 256:
            assert r.mode == "in_place"


def test_summary_figures(code_run) -> None:  # type: ignore[no-untyped-def]
    _, result, perf = code_run
    s = summarize(result, Reference(perf["a100-80gb"]), DEFAULT_MACHINES, SLOTable())
    assert s.num_completed == 400 and s.num_rejected == 0
    assert s.ttft.p50 <= s.ttft.p90 <= s.ttft.p99
    assert s.cost_per_hour == pytest.approx(3 * 38.0 + 2 * 17.6)
    assert s.power_w == pytest.approx(3 * 10200 + 2 * 6500)
    assert 0 < s.goodput_rps <= s.throughput_rps
    assert s.num_disaggregated + s.num_in_place == 400


def test_handoff_time_layerwise_hides_all_but_the_last_layer() -> None:
    slow = MachineSpec("m", 1.0, 1.0, link_gb_per_s=1e-6, kv_capacity_tokens=100_000)  # 1 KB/s
    design = Design(
        "pair", (PoolSpec("prefill", "prefill", "m", 1), PoolSpec("decode", "decode", "m", 1))
    )
    sched = SchedulerConfig(conditional_disaggregation=False)
    req = [TraceRequest("r", 0.0, prompt_tokens=64, output_tokens=3)]
    total = transfer_seconds(64, TOY, slow, slow)
    perf = {"m": ConstantPerfModel(10.0 * total, 0.5)}  # prefill much longer than the transfer
    for layerwise, visible in ((True, total / TOY.num_layers), (False, total)):
        cfg = SimConfig(scheduler=sched, layerwise_transfer=layerwise)
        (r,) = Simulator(design, TOY, {"m": slow}, perf, cfg).run(req).records
        assert r.transfer_end_s - r.prefill_end_s == pytest.approx(visible)
        # Two decode steps after the KV landed.
        assert r.finish_s == pytest.approx(r.transfer_end_s + 2 * 0.5)


def test_mixed_pool_borrows_under_a_prompt_burst_and_returns() -> None:
    sched = SchedulerConfig(
        conditional_disaggregation=False,
        mixed_pool=MixedPoolConfig(
            borrow_prefill_tokens=4000, return_prefill_tokens=500, cooldown_s=0.0
        ),
    )
    design = Design(
        "pair", (PoolSpec("prefill", "prefill", "m", 1), PoolSpec("decode", "decode", "m", 2))
    )
    burst = [TraceRequest(f"b{i}", 0.01 * i, 2000, 4) for i in range(20)]
    tail = [TraceRequest(f"t{i}", 50.0 + i, 100, 4) for i in range(5)]
    perf = {"m": ConstantPerfModel(0.3, 0.05)}
    sim = Simulator(design, TOY, {"m": TOY_MACHINE}, perf, SimConfig(scheduler=sched))
    res = sim.run(burst + tail)
    kinds = [(c.kind, c.worker_id) for c in res.role_changes]
    assert kinds[0][0] == "borrow" and ("return", kinds[0][1]) in kinds
    # While borrowed, the decode worker prefilled some prompts itself.
    assert any(r.mode == "in_place" and r.prefill_worker.startswith("decode") for r in res.records)
    assert all(r.num_finishes == 1 for r in res.records)


def test_simulator_pairs_exactly_as_the_cluster_scheduler_does() -> None:
    """Replaying the simulator's own snapshots through a fresh scheduler gives the same pairs."""
    design = make_design("Splitwise-HH", 2, 2)
    trace = retime_poisson(load_azure_trace("code", limit=60), rate=8.0, seed=2)
    sim = Simulator(design, LLAMA, DEFAULT_MACHINES, splitwise_perf(), SimConfig())
    seen: list[tuple[RequestView, list, Pairing]] = []
    original = sim.cls.schedule

    def spy(request, workers):  # type: ignore[no-untyped-def]
        decision = original(request, workers)
        seen.append((request, list(workers), decision))
        return decision

    sim.cls.schedule = spy  # type: ignore[method-assign]
    result = sim.run(trace)
    fresh = ClusterScheduler(SchedulerConfig())
    for request, workers, decision in seen:
        assert fresh.schedule(request, workers) == decision
    by_id = {r.request_id: r for r in result.records}
    for request, _, d in seen:
        r = by_id[request.request_id]
        assert (r.prefill_worker, r.decode_worker, r.mode) == (
            d.prefill_worker,
            d.decode_worker,
            d.mode,
        )
    assert dataclasses.is_dataclass(seen[0][2])


def test_cached_prefix_on_a_decode_worker_pulls_a_long_prompt_in_place() -> None:
    design = Design(
        "pair", (PoolSpec("prefill", "prefill", "m", 1), PoolSpec("decode", "decode", "m", 2))
    )
    cfg = SimConfig(
        scheduler=SchedulerConfig(in_place_max_tokens=64),
        limits=dataclasses.replace(SimConfig().limits, enable_prefix_caching=True),
    )
    reqs = [
        TraceRequest("first", 0.0, 1000, 4, shared_prefix_group=7, shared_prefix_tokens=992),
        TraceRequest("other", 0.5, 1000, 4),  # no shared prefix: disaggregated
        TraceRequest("second", 5.0, 1010, 4, shared_prefix_group=7, shared_prefix_tokens=992),
    ]
    perf = {"m": ConstantPerfModel(0.2, 0.05)}
    sim = Simulator(design, TOY, {"m": TOY_MACHINE}, perf, cfg)
    res = {r.request_id: r for r in sim.run(reqs).records}
    assert res["first"].mode == "disaggregated" and res["other"].mode == "disaggregated"
    # The first request's KV was imported into its decode worker, whose block pool still caches
    # the 62 shared blocks: the second prompt has 18 tokens left to compute, so it runs there.
    assert res["second"].mode == "in_place"
    assert res["second"].prefill_worker == res["first"].decode_worker
    # The engine's own scheduler found the hit too (it admitted the prompt from the cache).
    assert sim.workers[res["first"].decode_worker].blocks.prefix_cache_stats().hits == 992

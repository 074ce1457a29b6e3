"""The live cluster and the simulator turn the same worker state into the same WorkerView."""

from __future__ import annotations

import pytest

from batonserve.cluster.scheduling import WorkerView
from batonserve.cluster.sim.hardware import MachineSpec
from batonserve.cluster.sim.perf_model import ConstantPerfModel
from batonserve.cluster.sim.worker import EngineLimits, SimWorker
from batonserve.cluster.worker_stats import worker_view
from batonserve.workers.request import Request
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.worker_types import WorkerStats

MACHINE = MachineSpec("m", cost_per_hour=1.0, power_w=100.0, kv_capacity_tokens=10_000)


def _sim_worker(prefix_caching: bool) -> SimWorker:
    limits = EngineLimits(
        block_size=4, max_num_batched_tokens=8, max_num_seqs=4, enable_prefix_caching=prefix_caching
    )
    return SimWorker(
        "decode-0", "decode", "decode", MACHINE, ConstantPerfModel(0.1, 0.01), 32, limits
    )


def _live_stats(sw: SimWorker) -> WorkerStats:
    """What a live worker with this scheduler and pool reports (as workers/worker.py builds it)."""
    s = sw.sched.stats()
    return WorkerStats(
        name=sw.worker_id,
        pool=sw.pool,
        role=sw.role,
        healthy=True,
        running=s.num_running,
        waiting=s.num_waiting,
        pinned=s.num_pinned,
        pending_prefill_tokens=s.pending_prefill_tokens,
        num_free_blocks=max(0, sw.blocks.num_free_blocks - sw.reserved_blocks),
        num_blocks=sw.blocks.num_blocks,
        block_size=sw.blocks.block_size,
        kv_usage=s.kv_usage,
        prefix_queries=s.prefix_queries,
        prefix_hits=s.prefix_hits,
        steps=sw.num_steps,
        exports=0,
        imports=0,
    )


def _live_view(sw: SimWorker) -> WorkerView:
    """The live cluster's path: the poll's WorkerStats through `worker_view` (cluster/runtime.py)."""
    stats = _live_stats(sw)
    return worker_view(stats.name, stats.pool, sw.home_role, sw.role, stats, machine=MACHINE.name)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_live_and_sim_views_agree(prefix_caching: bool) -> None:
    sw = _sim_worker(prefix_caching)
    params = SamplingParams(max_tokens=4)
    for i, n in enumerate((10, 6, 3)):  # over the 8-token budget: one prompt stays partial
        sw.add(Request(f"r{i}", list(range(100 * i, 100 * i + n)), params))
    assert sw.view() == _live_view(sw)  # all waiting
    sw.start_step()
    sw.finish_step()
    sw.reserved_blocks = 3  # a handoff paired here, not yet imported
    view = sw.view()
    assert view.pending_prefill_tokens > 0 and view.running > 0
    assert view.num_free_blocks == sw.blocks.num_free_blocks - 3
    assert view == _live_view(sw)
    sw.role = "mixed"  # borrowed by the mixed pool
    assert sw.view() == _live_view(sw)
    assert sw.view().borrowed


def test_a_worker_that_has_not_reported_has_no_room() -> None:
    v = worker_view("prefill-0", "prefill", "prefill", "prefill", None, healthy=False)
    assert (v.num_free_blocks, v.num_total_blocks, v.running, v.block_size) == (0, 0, 0, 16)
    assert not v.schedulable

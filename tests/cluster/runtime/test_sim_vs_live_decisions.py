"""The scheduler policies decide identically in the live cluster and in the simulator.

What "identically" can honestly mean: the live cluster decides on worker snapshots that arrive
by polling, so a decision depends on *when* the request lands relative to the polls and to the
workers' steps; no two runs (live or live vs simulated) see the same loads unless arrivals are
controlled. This test controls them: requests come in bursts; a burst is submitted in one event
loop turn (no poll can land between its decisions), and the next burst waits until every worker
has reported itself idle. The simulator gets the same bursts, separated by a gap long enough to
drain it. At every decision both sides then see the same loads, and the test asserts:

1. replay: a fresh `ClusterScheduler` fed the live cluster's recorded snapshots makes exactly
   the live decisions (the live decision is a function of its views, nothing else);
2. same views: at every decision, the simulator's snapshots equal the live ones in what the
   scheduler reads (pending prefill tokens, queued + running requests, role, health, total KV
   blocks, and free KV blocks of decode-capable workers); `running` and `waiting` alone differ,
   since the live cluster counts a just-paired request as waiting until the worker reports, the
   simulator as running once its step starts, and a prefill worker's own KV blocks are not read;
3. same decisions: the same pairings (prefill worker, decode worker, in place or not) and the
   same rejections (reason and message), in the same order, for round_robin, jsq and splitwise.

Each burst holds at most one prompt short enough to run in place: a second one on a decode
worker still busy with the first would wait in the simulator without taking KV blocks yet,
while the live cluster's optimistic view counts its blocks at once. Splitwise breaks a tie in
free KV between decode workers on `running` alone, which differs as said above, so the prompt
lengths avoid such ties (with a tie, the live cluster and the simulator do pick different
decode workers: that is a real, timing-born difference, not hidden here). The mixed pool is off
(its role changes are timed by the live housekeeping clock, not by arrivals).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Sequence

import pytest
from testkit.loop_thread import LoopThread

from batonserve.cluster.api import AdmissionRejected, GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import (
    POLICIES,
    AdmissionConfig,
    DecisionLog,
    DecisionRecord,
    MixedPoolConfig,
    SchedulerConfig,
    replay,
)
from batonserve.cluster.scheduling.types import DECODE_CAPABLE
from batonserve.cluster.sim.design import Design, PoolSpec
from batonserve.cluster.sim.hardware import MachineSpec, ModelSpec
from batonserve.cluster.sim.simulator import SimConfig, Simulator
from batonserve.cluster.sim.trace import TraceRequest
from batonserve.cluster.sim.worker import EngineLimits
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

pytestmark = pytest.mark.cluster

BLOCK, BLOCKS, BUDGET = 4, 64, 64
SCRIPTED = ScriptedEngineConfig(
    block_size=BLOCK, num_blocks=BLOCKS, max_num_batched_tokens=BUDGET, enable_prefix_caching=False
)
LIMITS = EngineLimits(BLOCK, BUDGET, SCRIPTED.max_num_seqs, False)
# (prompt tokens, max tokens) per request; one burst per line. At most one short (in-place)
# prompt per burst; the long ones overflow max_pending_prefill_tokens (QUEUE_FULL), 130 is over
# max_prompt_tokens (PROMPT_TOO_LONG), 250 over a decode worker's whole KV (also refused).
BURSTS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((8, 3), (40, 4), (26, 2), (36, 5), (50, 3)),
    ((60, 2), (12, 4), (20, 3), (130, 2), (44, 3), (24, 2)),
    ((28, 3), (28, 3), (28, 3), (16, 5), (28, 3), (20, 2)),
    ((64, 2), (250, 2), (6, 6), (64, 3), (40, 2), (33, 4)),
)
GAP_S = 1000.0  # simulated seconds between bursts: far more than a burst takes


def sched_config(policy: str) -> SchedulerConfig:
    """Conditional disaggregation on, mixed pool off, admission limits that bite."""
    return SchedulerConfig(
        policy=policy,
        conditional_disaggregation=True,
        in_place_max_tokens=16,
        mixed_pool=MixedPoolConfig(enabled=False),
        admission=AdmissionConfig(max_pending_prefill_tokens=80, max_prompt_tokens=200),
    )


def prompt_of(i: int, n: int) -> list[int]:
    return [3 + (i * 37 + j * 11) % 90 for j in range(n)]


_SEQ = itertools.count()


def live_decisions(address: str, loop: LoopThread, policy: str) -> DecisionLog:
    """Run the bursts on a live cluster (2 prefill + 2 decode scripted workers), logging decisions."""
    cfg = ServeConfig(
        model="scripted",
        ray=RayConfig(address=address, namespace=f"batonserve-simlive-{next(_SEQ)}"),
        pools=(
            PoolConfig("prefill", "prefill", 2, num_cpus=0.25, resources={"prefill_node": 1}),
            PoolConfig("decode", "decode", 2, num_cpus=0.25, resources={"decode_node": 1}),
        ),
        scheduler=sched_config(policy),
    )
    cluster = loop.run(start_cluster(cfg, lambda _: None, scripted=SCRIPTED))
    log = DecisionLog()
    try:
        wait_fresh_idle(cluster)
        cluster.cls.recorder = log
        n = 0
        for burst in BURSTS:
            loop.run(run_burst(cluster, burst, n))
            n += len(burst)
            wait_fresh_idle(cluster)
    finally:
        loop.run(cluster.shutdown())
    return log


async def run_burst(cluster: Cluster, burst: Sequence[tuple[int, int]], first: int) -> None:
    """Submit a whole burst in one event-loop turn (no poll in between), then drain it."""
    streams = []
    for k, (plen, out) in enumerate(burst):
        i = first + k
        params = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
        with contextlib.suppress(AdmissionRejected):  # a rejection is a recorded decision too
            streams.append(
                cluster.generate(GenerateRequest(f"r{i}", tuple(prompt_of(i, plen)), params))
            )

    async def drain(s):  # type: ignore[no-untyped-def]
        async for _ in s:
            pass

    await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 60)


def wait_fresh_idle(cluster: Cluster, timeout: float = 30) -> None:
    """Every worker reported idle stats and no optimistic view adjustment is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ws = list(cluster.controller.workers.values())
        if (
            len(ws) == 4
            and all(
                w.healthy
                and w.stats is not None
                and w.stats.num_free_blocks == w.stats.num_blocks
                and not (w.stats.pinned or w.stats.imports or w.stats.exports)
                and not (w.stats.running or w.stats.waiting or w.stats.pending_prefill_tokens)
                for w in ws
            )
            and not cluster._views
            and not cluster.ledger.live()
            and not cluster.requests
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"not idle: {[w.stats for w in cluster.controller.workers.values()]}")


class FixedStep:
    """Every step takes 10 ms (timing does not matter here, only the order of events)."""

    def step_time(self, prefill_tokens: int, num_decodes: int) -> float:
        return 0.01


def sim_decisions(policy: str) -> DecisionLog:
    """The same bursts in the simulator: same pools, engine limits and KV capacity."""
    model = ModelSpec("scripted", 2, 1, 2, 0.0, 4)
    cpu = MachineSpec("cpu", 1.0, 100.0, kv_capacity_tokens=BLOCKS * BLOCK)
    design = Design(
        "live-shape",
        (PoolSpec("prefill", "prefill", "cpu", 2), PoolSpec("decode", "decode", "cpu", 2)),
    )
    trace, n = [], 0
    for b, burst in enumerate(BURSTS):
        for plen, out in burst:
            trace.append(TraceRequest(f"r{n}", b * GAP_S, plen, out))
            n += 1
    sim = Simulator(
        design, model, {"cpu": cpu}, {"cpu": FixedStep()}, SimConfig(sched_config(policy), LIMITS)
    )
    log = DecisionLog()
    sim.cls.recorder = log
    sim.run(trace)
    return log


def read_by_scheduler(rec: DecisionRecord) -> list[tuple[object, ...]]:
    """The parts of a decision's snapshots that the scheduler reads (see module docstring)."""
    out = []
    for w in sorted(rec.workers, key=lambda w: w.worker_id):
        free = w.num_free_blocks if w.role in DECODE_CAPABLE else None
        out.append(
            (
                w.worker_id,
                w.role,
                w.healthy,
                w.pending_prefill_tokens,
                w.running + w.waiting,
                free,
                w.num_total_blocks,
                w.block_size,
            )
        )
    return out


@pytest.mark.parametrize("policy", POLICIES.names())
def test_policy_decides_identically_live_and_simulated(
    ray_cluster: str, loop_thread: LoopThread, policy: str
) -> None:
    live = live_decisions(ray_cluster, loop_thread, policy)
    sim = sim_decisions(policy)
    n = sum(len(b) for b in BURSTS)
    assert len(live.records) == len(sim.records) == n
    # 1. The live decisions are reproduced from the live snapshots alone.
    assert replay(live.records, sched_config(policy)) == live.decisions()
    for lr, sr in zip(live.records, sim.records, strict=True):
        rid = lr.request.request_id
        assert (rid, lr.request.prompt_len, lr.request.max_tokens) == (
            sr.request.request_id,
            sr.request.prompt_len,
            sr.request.max_tokens,
        )
        # 2. Both saw the same loads ...
        assert read_by_scheduler(lr) == read_by_scheduler(sr), rid
        # 3. ... and decided the same.
        assert lr.decision == sr.decision, rid
    # The arrivals exercise every kind of outcome, and the policies differ on them.
    kinds = {type(d).__name__ + getattr(d, "mode", "") for d in live.decisions()}
    assert kinds == {"Pairingdisaggregated", "Pairingin_place", "Rejection"}


def test_the_arrivals_tell_the_policies_apart() -> None:
    """The bursts are not a case where every policy decides alike (else the test above is weak)."""
    runs = {p: sim_decisions(p).decisions() for p in POLICIES}
    assert runs["round_robin"] != runs["jsq"] != runs["splitwise"] != runs["round_robin"]

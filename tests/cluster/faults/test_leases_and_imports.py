"""Handoff leases under a long prefill queue, imports that must wait for decode KV, and attempts
restarted twice at once, on a live two-node Ray cluster (127.0.0.1) of scripted workers (real
scheduler, block pool and transport).

- A request that waits in the prefill queue longer than one lease is not re-prefilled: the
  lease is renewed while the prefill worker reports it queued, prefilling or sending.
- A complete handoff that does not fit the decode worker's free KV blocks waits there until
  decoding frees room, instead of failing and being prefilled again.
- Two restarts of one request in the same event-loop turn (two workers gone at once, as the
  chaos harness does it) launch each attempt once: the older launch task must not launch the
  newer attempt too, which submitted one worker-level id twice ("already in use").
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import pytest
from testkit.cluster_checks import collect, prompt_of, wait_idle
from testkit.loop_thread import LoopThread
from testkit.observer_recorder import Recorder
from testkit.scripted_reference import scripted_reference

from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.kv_transfer import KVTransferConfig
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

pytestmark = pytest.mark.cluster

PREFILL = PoolConfig(name="prefill", role="prefill", num_cpus=0.25, resources={"prefill_node": 1})
DECODE = PoolConfig(name="decode", role="decode", num_cpus=0.25, resources={"decode_node": 1})
# Every prompt goes through a handoff (no in-place prefill, no borrowing), so each request is
# prefilled exactly once exactly when it has exactly one handoff, and that one ended "ok".
DISAGGREGATED = SchedulerConfig(
    conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
)
_SEQ = itertools.count()


def _cluster(
    address: str, loop: LoopThread, scripted: ScriptedEngineConfig, lease_s: float
) -> tuple[Cluster, Recorder]:
    cfg = ServeConfig(
        model="scripted",
        ray=RayConfig(address=address, namespace=f"leases-{next(_SEQ)}"),
        pools=(PREFILL, DECODE),
        scheduler=DISAGGREGATED,
        kv_transfer=KVTransferConfig(lease_s=lease_s),
    )
    rec = Recorder()
    return loop.run(start_cluster(cfg, lambda _: None, scripted=scripted, observer=rec)), rec


@pytest.fixture
def running(ray_cluster: str, loop_thread: LoopThread) -> Iterator[list[Cluster]]:
    """Clusters a test starts; each is shut down after it."""
    started: list[Cluster] = []
    yield started
    for c in started:
        loop_thread.run(c.shutdown())


def _serve_all(
    cluster: Cluster, loop: LoopThread, prompts: list[list[int]], params: SamplingParams
) -> list[list[int]]:
    async def run() -> list[list[int]]:
        streams = (collect(cluster, f"q{i}", p, params) for i, p in enumerate(prompts))
        return await asyncio.gather(*streams)

    return loop.run(run(), timeout=90)


def test_a_queue_longer_than_the_lease_is_prefilled_once(
    ray_cluster: str, loop_thread: LoopThread, running: list[Cluster]
) -> None:
    # 32 prompts of 48 tokens through one prefill worker at 8 tokens and ~20 ms a step: the
    # queue takes 4 s or more, two leases; the last requests wait far longer than one lease.
    # (A lease of 2 s, not less: a starved event loop may run the lease check before it reads
    # the polls that renewed it.)
    scripted = ScriptedEngineConfig(num_blocks=512, max_num_batched_tokens=8, layer_delay_s=0.01)
    cluster, rec = _cluster(ray_cluster, loop_thread, scripted, lease_s=2.0)
    running.append(cluster)
    prompts = [prompt_of(i, 48) for i in range(32)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    outs = _serve_all(cluster, loop_thread, prompts, params)
    assert outs == scripted_reference(scripted, prompts, params)
    # One handoff per request and every one acknowledged: no lease ran out, nothing redone.
    assert rec.outcomes() == ["ok"] * len(prompts), rec.outcomes()
    wait_idle(cluster)


def test_an_import_that_does_not_fit_waits_for_room(
    ray_cluster: str, loop_thread: LoopThread, running: list[Cluster]
) -> None:
    # Decode KV of 40 blocks (160 tokens). Each request lands with a 16-token prompt (4 blocks,
    # all the CLS counts) and grows to 56 tokens (14 blocks) while decoding; prompts trickle in
    # from the prefill side 4 tokens a step, so later imports find the blocks taken by the
    # growth of earlier ones and must wait for them to finish.
    scripted = ScriptedEngineConfig(num_blocks=40, max_num_batched_tokens=4, layer_delay_s=0.002)
    cluster, rec = _cluster(ray_cluster, loop_thread, scripted, lease_s=30.0)
    running.append(cluster)
    prompts = [prompt_of(100 + i, 16) for i in range(8)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = _serve_all(cluster, loop_thread, prompts, params)
    assert outs == scripted_reference(scripted, prompts, params)
    assert rec.outcomes() == ["ok"] * len(prompts), rec.outcomes()  # no import failed
    wait_idle(cluster)


def test_two_restarts_in_one_turn_launch_each_attempt_once(
    ray_cluster: str, loop_thread: LoopThread, running: list[Cluster]
) -> None:
    # The shipped scheduler: a short prompt runs in place on the decode worker.
    scripted = ScriptedEngineConfig(layer_delay_s=0.005)
    cfg = ServeConfig(
        model="scripted",
        ray=RayConfig(address=ray_cluster, namespace=f"attempts-{next(_SEQ)}"),
        pools=(PREFILL, DECODE),
    )
    cluster = loop_thread.run(start_cluster(cfg, lambda _: None, scripted=scripted))
    running.append(cluster)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompt = prompt_of(5, 10)  # short: in place on the decode worker

    async def run() -> tuple[list[int], int]:
        stream = cluster.generate(GenerateRequest("twice", tuple(prompt), params))
        st = cluster.requests["twice"]
        toks: list[int] = []
        async for d in stream:
            toks += d.token_ids
            if len(toks) == 2:  # mid-stream: restart twice before any launch task runs
                cluster.restart(st, "test: first")
                cluster.restart(st, "test: second")
        return toks, st.attempts

    toks, attempts = loop_thread.run(run(), timeout=60)
    assert toks == scripted_reference(scripted, [prompt], params)[0]
    assert attempts == 3  # the first, then one per restart: no refusal forced a fourth
    wait_idle(cluster)

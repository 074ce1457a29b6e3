"""Long prompts served through a ring group of 2 and 3 prefill workers on a two-node Ray cluster
(127.0.0.1), tiny random Llama: greedy output identical to the in-process Engine, decoding
continues from the delivered KV, short prompts take the normal path, a killed member gives a
bounded-time failure and the request is retried; KV block pools empty afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from testkit.cluster_checks import collect, prompt_of, wait_idle
from testkit.hf_tiny import make_tiny_model
from testkit.loop_thread import LoopThread
from testkit.observer_recorder import Recorder

from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.sp_serving.config import SequenceParallelConfig
from batonserve.workers.sp_serving.report import SPStepReport

pytestmark = pytest.mark.cluster

ENGINE = EngineConfig(
    dtype="float32", device="cpu", block_size=4, num_kv_blocks=512, max_num_batched_tokens=32
)
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
# Prompts of >= 48 tokens take the ring: N = 2 up to 64 tokens, 3 above.
SP = SequenceParallelConfig(
    enabled=True, threshold_tokens=48, tokens_per_rank=32, max_group_size=3, timeout_s=8.0
)
PREFILL = PoolConfig(
    name="prefill", role="prefill", replicas=3, num_cpus=0.5, resources={"prefill_node": 1}
)
DECODE = PoolConfig(name="decode", role="decode", num_cpus=0.5, resources={"decode_node": 1})


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def reference(model: str) -> Any:
    """Greedy completions of the in-process Engine (one worker prefilled everything)."""
    engine = Engine(model, ENGINE)
    return lambda prompt: engine.generate([prompt], GREEDY)[0].token_ids


@pytest.fixture(scope="module")
def ring(
    ray_cluster: str, loop_thread: LoopThread, model: str
) -> Iterator[tuple[Cluster, Recorder]]:
    cfg = ServeConfig(
        model=model,
        ray=RayConfig(address=ray_cluster, namespace="batonserve-ring"),
        engine=ENGINE,
        pools=(PREFILL, DECODE),
        scheduler=SchedulerConfig(
            conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
        ),
        sequence_parallel=SP,
    )
    rec = Recorder()
    cluster = loop_thread.run(start_cluster(cfg, lambda _: None, observer=rec), timeout=180)
    assert cluster.controller.ring is not None and cluster.controller.ring.ready
    yield cluster, rec
    loop_thread.run(cluster.shutdown())


def wait_reports(rec: Recorder, count: int, timeout: float = 10) -> list[SPStepReport]:
    deadline = time.monotonic() + timeout
    while len(rec.sp) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return list(rec.sp)


@pytest.mark.parametrize(("length", "size"), [(60, 2), (101, 3)])
def test_long_prompt_through_ring_matches_single_worker(
    ring: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any, length: int, size: int
) -> None:
    cluster, rec = ring
    rec.sp.clear()
    rec.handoffs.clear()
    prompts = [prompt_of(i, length + i) for i in range(2)]

    async def run() -> list[list[int]]:
        return await asyncio.gather(
            *(collect(cluster, f"ring{length}-{i}", p, GREEDY) for i, p in enumerate(prompts))
        )

    assert loop_thread.run(run()) == [reference(p) for p in prompts]
    reports = wait_reports(rec, 2 * size)
    assert sorted((r.world_size, r.rank) for r in reports) == sorted(
        (size, r) for r in range(size) for _ in prompts
    )
    assert all(r.schedule in ("ring", "tokenring", "allgather") for r in reports)
    assert all(r.compute_s > 0 and 0.0 <= r.hidden_fraction <= 1.0 for r in reports)
    assert [h.outcome for h in rec.handoffs] == ["ok"] * len(prompts)
    wait_idle(cluster)


def test_short_prompt_takes_normal_path(
    ring: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    cluster, rec = ring
    rec.sp.clear()
    prompt = prompt_of(5, 30)
    assert loop_thread.run(collect(cluster, "short", prompt, GREEDY)) == reference(prompt)
    time.sleep(0.6)  # a poll round: a ring prefill would have reported by now
    assert rec.sp == []
    wait_idle(cluster)


def test_member_killed_mid_ring_fails_in_bounded_time_and_request_retries(
    ring: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    cluster, rec = ring
    rec.handoffs.clear()
    ring_group = cluster.controller.ring
    assert ring_group is not None
    prompt = prompt_of(9, 70)  # N = 3: every member takes part; prefill-0 leads (zigzag)
    victim = cluster.controller.workers["prefill-2"]
    send = ring_group.submit

    def kill_then_submit(choice: Any, spec: Any) -> None:
        # The job is numbered and on its way; one member dies before it can take part, so
        # the others block in the first collective until the group's timeout.
        ray.kill(victim.actor, no_restart=True)
        ring_group.submit = send  # type: ignore[method-assign]
        send(choice, spec)

    ring_group.submit = kill_then_submit  # type: ignore[method-assign]
    t0 = time.monotonic()
    try:
        out = loop_thread.run(collect(cluster, "killed", prompt, GREEDY), timeout=90)
    finally:
        ring_group.submit = send  # type: ignore[method-assign]
    elapsed = time.monotonic() - t0
    assert out == reference(prompt)
    assert elapsed < SP.timeout_s + 30  # an error within the group timeout, never a hang
    assert rec.handoffs[0].outcome == "failed" and rec.handoffs[-1].outcome == "ok"
    # The group is rebuilt with the replacement; long prompts take the ring again.
    deadline = time.monotonic() + 60
    while ring_group.available() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ring_group.available() == 3
    rec.sp.clear()
    again = prompt_of(10, 90)
    assert loop_thread.run(collect(cluster, "again", again, GREEDY)) == reference(again)
    assert {r.world_size for r in wait_reports(rec, 3)} == {3}
    wait_idle(cluster, timeout=30)


def test_ring_member_killed_under_load(
    ring: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    """32 concurrent streams, a quarter of them long enough for the ring; a ring member killed
    while they run: every stream completes with exactly the undisturbed greedy tokens."""
    cluster, _ = ring
    ring_group = cluster.controller.ring
    assert ring_group is not None
    deadline = time.monotonic() + 60
    while ring_group.available() < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    prompts = [prompt_of(20 + i, 70 + i if i % 4 == 0 else 12 + i) for i in range(32)]
    victim = cluster.controller.workers["prefill-1"]

    async def run() -> list[list[int]]:
        tasks = [
            asyncio.create_task(collect(cluster, f"load-{i}", p, GREEDY))
            for i, p in enumerate(prompts)
        ]
        await asyncio.sleep(0.3)  # the streams are under way
        ray.kill(victim.actor, no_restart=True)
        return await asyncio.gather(*tasks)

    assert loop_thread.run(run(), timeout=240) == [reference(p) for p in prompts]
    wait_idle(cluster, timeout=60)

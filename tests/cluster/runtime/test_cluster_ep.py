"""Expert parallelism served: demo-moe with engine.expert_parallel_size 2 on a two-node local Ray.

One prefill and one decode worker, each leading an EP group with one follower on its own node;
the KV handoff writes into the decode group (the follower mirrors it). Greedy tokens must equal
the offline Engine's; a killed follower ends its worker, the controller replaces it (with a fresh
follower) and the requests still finish with the same tokens; no follower outlives the cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from testkit.cluster_checks import collect, prompt_of, wait_idle
from testkit.loop_thread import LoopThread
from testkit.observer_recorder import Recorder

from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams

pytestmark = pytest.mark.cluster

MODEL = "demo-moe"
NAMESPACE = "batonserve-ep"
# float32, as the other resume tests: "auto" may pick bf16 on CPU, where a resumed request's
# greedy tokens (recomputed from prompt + tokens sent) can differ from the uninterrupted reference.
ENGINE = EngineConfig(
    dtype="float32",
    device="cpu",
    block_size=4,
    num_kv_blocks=128,
    max_num_batched_tokens=64,
    expert_parallel_size=2,
)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PREFILL = PoolConfig(name="prefill", role="prefill", num_cpus=0.5, resources={"prefill_node": 1})
DECODE = PoolConfig(name="decode", role="decode", num_cpus=0.5, resources={"decode_node": 1})
_SEQ = itertools.count()


@pytest.fixture(scope="module")
def reference() -> Any:
    engine = Engine(MODEL, dataclasses.replace(ENGINE, expert_parallel_size=1))
    cache: dict[tuple[int, ...], list[int]] = {}

    def get(prompt: list[int]) -> list[int]:
        if tuple(prompt) not in cache:
            cache[tuple(prompt)] = engine.generate([prompt], GREEDY)[0].token_ids
        return cache[tuple(prompt)]

    return get


@pytest.fixture(scope="module")
def ep(ray_cluster: str, loop_thread: LoopThread) -> Iterator[tuple[Cluster, Recorder]]:
    cfg = ServeConfig(
        model=MODEL,
        ray=RayConfig(address=ray_cluster, namespace=NAMESPACE),
        engine=ENGINE,
        pools=(PREFILL, DECODE),
        scheduler=SchedulerConfig(
            conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
        ),
    )
    rec = Recorder()
    cluster = loop_thread.run(start_cluster(cfg, lambda _: None, observer=rec))
    yield cluster, rec
    loop_thread.run(cluster.shutdown())
    # No follower outlives the cluster. Checked here, after every test has used the cluster,
    # rather than by a test that shuts the shared cluster down under the ones after it.
    wait_followers(0)


def followers() -> list[str]:
    """Names of the live EP follower actors of this module's cluster."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == NAMESPACE and "-ep" in a["name"])


def wait_followers(want: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(names := followers()) != want:
        assert time.monotonic() < deadline, f"followers: {names}, want {want}"
        time.sleep(0.2)
    return names


def run_many(cluster: Cluster, loop: LoopThread, tag: str, prompts: list[list[int]]) -> Any:
    async def run() -> list[list[int]]:
        return await asyncio.gather(
            *(collect(cluster, f"{tag}{next(_SEQ)}", p, GREEDY) for p in prompts)
        )

    return loop.run(run())


def test_concurrent_requests_match_offline_engine(
    ep: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    """Several concurrent greedy requests (odd and even token counts) through prefill -> decode."""
    cluster, rec = ep
    rec.handoffs.clear()  # only this test's requests, whichever tests ran before
    names = wait_followers(2)
    assert {n.split("-ep")[0] for n in names} == {"prefill-0", "decode-0"}
    prompts = [prompt_of(i, 5 + 3 * i) for i in range(6)]
    assert run_many(cluster, loop_thread, "c", prompts) == [reference(p) for p in prompts]
    assert rec.outcomes() == ["ok"] * len(prompts)  # every request went through a KV handoff
    wait_idle(cluster)
    stats = cluster.controller.workers["decode-0"].stats
    assert stats is not None and stats.ep_tuner is not None and stats.ep_tuner.forwards > 0
    # The tuner's choices reach the observer (the router's Metrics) with the worker snapshots.
    deadline = time.monotonic() + 10
    while not any(w == "decode-0" and st.forwards > 0 for w, _, st in rec.ep_tuners):
        assert time.monotonic() < deadline, "no ep_tuner report from decode-0"
        time.sleep(0.2)


def _kill_follower(of: str) -> str:
    name = next(n for n in followers() if n.startswith(f"{of}-ep"))
    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    return name


def test_follower_killed_while_idle(
    ep: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    """The next requests fail over to a replaced prefill worker and keep their tokens."""
    cluster, _ = ep
    victim = cluster.controller.workers["prefill-0"]
    incarnation = victim.incarnation
    dead = _kill_follower("prefill-0")
    prompts = [prompt_of(20 + i, 9 + i) for i in range(3)]
    assert run_many(cluster, loop_thread, "i", prompts) == [reference(p) for p in prompts]
    assert victim.incarnation == incarnation + 1
    wait_idle(cluster)
    names = wait_followers(2)
    assert dead not in names


def test_follower_killed_under_load(
    ep: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    """Killing the decode worker's follower mid-generation: every request completes exactly."""
    cluster, _ = ep
    victim = cluster.controller.workers["decode-0"]
    incarnation = victim.incarnation
    prompts = [prompt_of(30 + i, 10 + 7 * i) for i in range(4)]
    streamed: list[int] = []

    async def one(i: int, prompt: list[int]) -> list[int]:
        toks: list[int] = []
        async for d in cluster.generate(GenerateRequest(f"l{i}", tuple(prompt), GREEDY)):
            toks += d.token_ids
            streamed.append(i)
        return toks

    async def run() -> list[list[int]]:
        tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 30
        while len(streamed) < 2:  # first tokens are out: the decode group is generating
            assert time.monotonic() < deadline, "no tokens streamed"
            await asyncio.sleep(0.005)
        _kill_follower("decode-0")
        return list(await asyncio.gather(*tasks))

    assert loop_thread.run(run()) == [reference(p) for p in prompts]
    assert victim.incarnation == incarnation + 1
    wait_idle(cluster)
    wait_followers(2)

"""A request whose only decode worker died waits for the replacement, however long it takes to
start (up to ray.worker_start_timeout_s), instead of failing after a fixed retry window: on a
loaded machine, or with a model that loads slowly, a replacement can take longer than that
window, and every stream of the run ended UNAVAILABLE (found by the chaos harness at load 20+).
Live two-node Ray on 127.0.0.1, scripted workers, one prefill and one decode worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from testkit.cluster_checks import prompt_of, wait_idle
from testkit.loop_thread import LoopThread
from testkit.scripted_reference import scripted_reference

from batonserve.cluster import runtime
from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

pytestmark = pytest.mark.cluster

SCRIPTED = ScriptedEngineConfig(layer_delay_s=0.005)
RETRY_S = 1.0  # the fixed window, shortened for the test
DELAY_S = 4.0  # the replacement takes this much longer than the window


@pytest.fixture
def cluster(ray_cluster: str, loop_thread: LoopThread) -> Iterator[Cluster]:
    cfg = ServeConfig(
        model="scripted",
        ray=RayConfig(address=ray_cluster, namespace="replacement-wait"),
        pools=(
            PoolConfig("prefill", "prefill", num_cpus=0.25, resources={"prefill_node": 1}),
            PoolConfig("decode", "decode", num_cpus=0.25, resources={"decode_node": 1}),
        ),
    )
    c = loop_thread.run(start_cluster(cfg, lambda _: None, scripted=SCRIPTED))
    yield c
    loop_thread.run(c.shutdown())


def test_a_request_waits_for_a_slow_replacement(
    cluster: Cluster, loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "RETRY_S", RETRY_S)
    replace = cluster.controller.replace

    async def slow_replace(name: str) -> Any:
        await asyncio.sleep(RETRY_S + DELAY_S)
        return await replace(name)

    cluster.controller.replace = slow_replace  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [prompt_of(i, 10 + 40 * i) for i in range(4)]  # in place and handed off

    async def one(i: int) -> list[int]:
        toks: list[int] = []
        async for d in cluster.generate(GenerateRequest(f"w{i}", tuple(prompts[i]), params)):
            toks += d.token_ids
            if i == 0 and len(toks) == 4:  # the only decode worker dies mid-stream
                ray.kill(cluster.controller.workers["decode-0"].actor)
        return toks

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    outs = loop_thread.run(run(), timeout=120)
    assert outs == [scripted_reference(SCRIPTED, [p], params)[0] for p in prompts]
    assert cluster.controller.workers["decode-0"].incarnation == 1
    wait_idle(cluster)

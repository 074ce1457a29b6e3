"""Seeded sampling is exact across a worker death on a live cluster: the bundled demo model in
float32, one prefill and two decode workers, the shipped scheduler, 8 concurrent streams with
temperature > 0 and a seed each; the decode worker of the first stream to reach 4 tokens is
killed. Every stream must give exactly the offline engine's seeded tokens (the sampler's noise is
a function of seed, position and token id, so the resumed attempt draws what the dead one would
have) and every block pool must come back to its baseline."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import ray
from testkit.cluster_checks import wait_idle
from testkit.loop_thread import LoopThread

from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.tokenizer import Tokenizer

pytestmark = pytest.mark.cluster

TEXTS = (
    "def fibonacci(n):",
    "import os\n",
    "class Foo:",
    "for i in range(",
    "return self.",
    "while True:",
    "# Copyright",
    'if __name__ == "__main__":',
)
MAX_TOKENS = 32
KILL_AT = 4
ENGINE = EngineConfig(dtype="float32")  # exactness across a resume is claimed in float32
POOLS = (
    PoolConfig(name="prefill", role="prefill", num_cpus=0.25, resources={"prefill_node": 1}),
    PoolConfig(
        name="decode", role="decode", replicas=2, num_cpus=0.25, resources={"decode_node": 1}
    ),
)
PARAMS = [
    SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=100 + i)
    for i in range(len(TEXTS))
]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = Tokenizer.from_model_dir(resolve_model_dir("demo"))
    return [tok.encode(t) for t in TEXTS]


@pytest.fixture(scope="module")
def cluster(ray_cluster: str, loop_thread: LoopThread) -> Iterator[Cluster]:
    cfg = ServeConfig(
        model="demo",
        ray=RayConfig(address=ray_cluster, namespace="seeded-resume"),
        engine=ENGINE,
        pools=POOLS,
    )
    c = loop_thread.run(start_cluster(cfg, lambda _: None), timeout=300)
    yield c
    loop_thread.run(c.shutdown())


def test_seeded_streams_are_exact_across_a_decode_kill(
    cluster: Cluster, loop_thread: LoopThread, prompts: list[list[int]]
) -> None:
    engine = Engine("demo", ENGINE)
    expected = [list(o.token_ids) for o in engine.generate(prompts, PARAMS)]
    greedy = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    assert expected != [list(o.token_ids) for o in greedy]  # really sampled
    wait_idle(cluster, timeout=60)
    killed: list[str] = []

    async def one(i: int) -> list[int]:
        toks: list[int] = []
        async for d in cluster.generate(GenerateRequest(f"s{i}", tuple(prompts[i]), PARAMS[i])):
            toks += d.token_ids
            a = cluster.requests[f"s{i}"].attempt if f"s{i}" in cluster.requests else None
            if not killed and len(toks) >= KILL_AT and a is not None:
                killed.append(a.decode)
                ray.kill(cluster.controller.workers[a.decode].actor)
        return toks

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    outs = loop_thread.run(run(), timeout=180)
    assert killed, "no stream reached the kill point"
    for i, (got, want) in enumerate(zip(outs, expected, strict=True)):
        assert got == want, f"stream {i} ({TEXTS[i]!r}) after killing {killed[0]}"
    wait_idle(cluster, timeout=60)

"""Tensor parallelism served: the demo model with prefill and decode workers of different TP
sizes on a two-node local Ray (gloo on CPU).

Each TP worker is gang-placed (one placement group bundle per rank, STRICT_PACK on its node); the
KV handoff goes between groups of different sizes. Greedy tokens must equal the offline Engine's.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from testkit.cluster_checks import collect, prompt_of, wait_idle
from testkit.loop_thread import LoopThread
from testkit.observer_recorder import Recorder

from batonserve.cluster.config import ConfigError, PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.kv_transfer.config import KVTransferConfig
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.sp_serving.config import SequenceParallelConfig

pytestmark = pytest.mark.cluster

MODEL = "demo"
NAMESPACE = "batonserve-tp"
ENGINE = EngineConfig(
    dtype="float32", device="cpu", block_size=4, num_kv_blocks=128, max_num_batched_tokens=64
)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
_SEQ = itertools.count()


def _pools(p_tp: int, d_tp: int) -> tuple[PoolConfig, PoolConfig]:
    return (
        PoolConfig(
            "prefill",
            "prefill",
            num_cpus=0.5,
            resources={"prefill_node": 1},
            tensor_parallel_size=p_tp,
        ),
        PoolConfig(
            "decode",
            "decode",
            num_cpus=0.5,
            resources={"decode_node": 1},
            tensor_parallel_size=d_tp,
        ),
    )


@pytest.fixture(scope="module")
def reference() -> Any:
    """reference(model, prompt) -> the offline single engine's greedy tokens."""
    engines: dict[str, Engine] = {}

    def get(model: str, prompt: list[int]) -> list[int]:
        if model not in engines:
            engines[model] = Engine(model, ENGINE)
        return list(engines[model].generate([prompt], GREEDY)[0].token_ids)

    return get


def tp_ranks() -> list[str]:
    """Names of the live follower ranks in this module's namespace."""
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(a["name"] for a in named if a["namespace"] == NAMESPACE and "-tp" in a["name"])


@pytest.fixture
def serve(ray_cluster: str, loop_thread: LoopThread) -> Iterator[Any]:
    """serve(p_tp, d_tp, transport) -> a running cluster; shut down after the test."""
    started: list[Cluster] = []

    def start(
        p_tp: int, d_tp: int, transport: str = "torch_dist", model: str = MODEL
    ) -> tuple[Cluster, Recorder]:
        cfg = ServeConfig(
            model=model,
            ray=RayConfig(address=ray_cluster, namespace=NAMESPACE),
            engine=ENGINE,
            pools=_pools(p_tp, d_tp),
            kv_transfer=KVTransferConfig(transport=transport),  # type: ignore[arg-type]
            scheduler=SchedulerConfig(
                conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
            ),
        )
        rec = Recorder()
        cluster = loop_thread.run(start_cluster(cfg, lambda _: None, observer=rec))
        started.append(cluster)
        return cluster, rec

    yield start
    for cluster in started:
        loop_thread.run(cluster.shutdown())
    # Followers die with their owner and placement group, which Ray carries out a moment after
    # the kill (longer when the worker's own 5 s shutdown timed out under load): bounded wait.
    deadline = time.monotonic() + 30
    while tp_ranks() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not tp_ranks(), "a follower rank outlived its cluster by 30 s"


@pytest.mark.parametrize(
    ("p_tp", "d_tp", "transport", "model"),
    [
        (2, 1, "torch_dist", MODEL),
        (1, 2, "torch_dist", MODEL),
        (2, 2, "torch_dist", MODEL),
        (2, 1, "object_store", MODEL),
        (1, 2, "torch_dist", "demo-moe"),  # experts split by intermediate width
    ],
)
def test_handoff_between_tp_sizes_matches_offline_engine(
    serve: Any,
    loop_thread: LoopThread,
    reference: Any,
    p_tp: int,
    d_tp: int,
    transport: str,
    model: str,
) -> None:
    """P(TP=p) -> D(TP=d): concurrent greedy requests, every one through a KV handoff, give the
    single engine's tokens; each TP worker has its follower ranks."""
    cluster, rec = serve(p_tp, d_tp, transport, model)
    want = {f"prefill-0-tp{r}" for r in range(1, p_tp)} | {
        f"decode-0-tp{r}" for r in range(1, d_tp)
    }
    assert {n.rsplit("-", 1)[0] for n in tp_ranks()} == want
    for name, tp in (("prefill-0", p_tp), ("decode-0", d_tp)):
        pg = cluster.controller.workers[name].placement
        if tp == 1:
            assert pg is None
            continue
        table = ray.util.placement_group_table(pg)  # one bundle per rank, on one node
        assert table["strategy"] == "STRICT_PACK" and len(table["bundles"]) == tp
        assert table["state"] == "CREATED" and len(set(table["bundles_to_node_id"].values())) == 1
    prompts = [prompt_of(i, 5 + 3 * i) for i in range(5)]

    async def run() -> list[list[int]]:
        return await asyncio.gather(
            *(collect(cluster, f"t{next(_SEQ)}", p, GREEDY) for p in prompts)
        )

    assert loop_thread.run(run()) == [reference(model, p) for p in prompts]
    assert rec.outcomes() == ["ok"] * len(prompts)  # every request went through a handoff
    wait_idle(cluster)
    # Each follower rank sent (prefill) or received (decode) its own KV heads over its own
    # transport: they never passed through rank 0.
    moved = {
        n.rsplit("-", 1)[0]: ray.get(
            ray.get_actor(n, namespace=NAMESPACE).kv_bytes.remote(), timeout=30
        )
        for n in tp_ranks()
    }
    for n, (sent, received) in moved.items():
        assert (sent > 0, received > 0) == (n.startswith("prefill"), n.startswith("decode")), n
    if p_tp == d_tp:  # equal layouts: rank i sends to rank i only
        assert moved["prefill-0-tp1"][0] == moved["decode-0-tp1"][1]


def test_ring_prefill_with_tp_is_refused() -> None:
    """Ring prefill runs one rank per ring member: a TP prefill pool in a ring is a config error."""
    pools = (
        PoolConfig("prefill", "prefill", replicas=2, tensor_parallel_size=2),
        PoolConfig("decode", "decode"),
    )
    with pytest.raises(ConfigError, match=r"pools\[0\].tensor_parallel_size: 2 cannot be combined"):
        ServeConfig(pools=pools, sequence_parallel=SequenceParallelConfig(enabled=True))


def test_fit_check_counts_every_rank() -> None:
    """A TP worker is gang-placed on one node: 2 ranks of 1 CPU fit a 2-CPU node, 4 do not."""
    from batonserve.cluster.placement import StartupError, check_pools_fit, worker_demand

    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    tp2 = PoolConfig("p", "prefill", num_cpus=1, tensor_parallel_size=2)
    assert worker_demand(tp2) == {"CPU": 2.0}
    check_pools_fit([tp2], nodes)
    tp4 = PoolConfig("p", "prefill", num_cpus=1, tensor_parallel_size=4)
    with pytest.raises(StartupError, match=r"pool 'p'.*CPU=4"):
        check_pools_fit([tp4], nodes)


def test_unsplittable_model_is_refused_before_workers_start() -> None:
    """demo has 8 query heads: a pool at TP=3 is a ConfigError naming the pool and the heads."""
    cfg = ServeConfig(model=MODEL, pools=_pools(3, 1))
    with pytest.raises(ConfigError, match=r"pools\[0\]\.tensor_parallel_size: 3 does not divide "
                       r"num_attention_heads \(8\)"):  # fmt: skip
        asyncio.run(start_cluster(cfg, lambda _: None))

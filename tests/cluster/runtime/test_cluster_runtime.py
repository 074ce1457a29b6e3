"""The live cluster on a two-node Ray cluster (127.0.0.1) with a tiny random Llama: greedy outputs
token-identical to the in-process Engine in every mode, 32 concurrent requests, lease expiry,
and workers killed mid-prefill and mid-generation; KV block pools empty afterwards."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from testkit.cluster_checks import collect as collect_stream
from testkit.cluster_checks import prompt_of, wait_idle
from testkit.hf_tiny import make_tiny_model
from testkit.loop_thread import LoopThread
from testkit.observer_recorder import Recorder

from batonserve.cluster.api import GenerateRequest
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, SchedulerConfig
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.kv_transfer import KVTransferConfig
from batonserve.workers.sampling_params import SamplingParams

pytestmark = pytest.mark.cluster

ENGINE = EngineConfig(
    dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_num_batched_tokens=16
)
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PREFILL = PoolConfig(name="prefill", role="prefill", num_cpus=0.5, resources={"prefill_node": 1})
DECODE = PoolConfig(name="decode", role="decode", num_cpus=0.5, resources={"decode_node": 1})


_SEQ = itertools.count()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="module")
def reference(model: str) -> Any:
    """Greedy completions from the in-process Engine, same engine config."""
    engine = Engine(model, ENGINE)
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def get(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
        key = (tuple(prompt), params.max_tokens)
        if key not in cache:
            cache[key] = engine.generate([prompt], params)[0].token_ids
        return cache[key]

    return get


def make(address: str, loop: LoopThread, **kw: Any) -> tuple[Cluster, Recorder]:
    scheduler = kw.pop("scheduler", SchedulerConfig(conditional_disaggregation=False))
    cfg = ServeConfig(
        model=kw.pop("model"),
        # A namespace per cluster: clusters of different tests may overlap in time.
        ray=RayConfig(address=address, namespace=f"batonserve-{next(_SEQ)}"),
        engine=ENGINE,
        pools=kw.pop("pools", (PREFILL, DECODE)),
        scheduler=scheduler,
        kv_transfer=kw.pop("kv_transfer", KVTransferConfig()),
    )
    rec = Recorder()
    cluster = loop.run(start_cluster(cfg, lambda _: None, observer=rec))
    return cluster, rec


async def collect(
    cluster: Cluster, rid: str, prompt: list[int], params: SamplingParams = GREEDY
) -> list[int]:
    return await collect_stream(cluster, rid, prompt, params)


@pytest.fixture(scope="module")
def gloo(
    ray_cluster: str, loop_thread: LoopThread, model: str
) -> Iterator[tuple[Cluster, Recorder]]:
    cluster, rec = make(
        ray_cluster,
        loop_thread,
        model=model,
        scheduler=SchedulerConfig(
            conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
        ),
    )
    yield cluster, rec
    loop_thread.run(cluster.shutdown())


def test_disaggregated_gloo_32_concurrent(
    gloo: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    cluster, rec = gloo
    rec.handoffs.clear()  # only this test's requests, whichever tests ran before
    prompts = [prompt_of(i, 6 + i % 23) for i in range(32)]

    async def run() -> list[list[int]]:
        return await asyncio.gather(*(collect(cluster, f"g{i}", p) for i, p in enumerate(prompts)))

    outs = loop_thread.run(run())
    assert outs == [reference(p) for p in prompts]
    assert rec.outcomes() == ["ok"] * 32  # every request went prefill -> decode
    assert {(r.from_pool, r.to_pool) for r in rec.handoffs} == {("prefill", "decode")}
    wait_idle(cluster)


def test_request_ending_on_its_first_token_cancels_its_handoff(
    gloo: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    """max_tokens=1: the prefill side's first token ends the request, so the handoff opened
    for it is recorded as cancelled, not failed, and nothing is left behind."""
    cluster, rec = gloo
    rec.handoffs.clear()
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompts = [prompt_of(50 + i, 8 + i) for i in range(4)]

    async def run() -> list[list[int]]:
        return await asyncio.gather(
            *(collect(cluster, f"one{i}", p, one) for i, p in enumerate(prompts))
        )

    assert loop_thread.run(run()) == [reference(p, one) for p in prompts]
    wait_idle(cluster)
    # One handoff per request, none counted as failed (before: all four were "failed").
    assert len(rec.outcomes()) == 4 and set(rec.outcomes()) <= {"ok", "cancelled"}, rec.outcomes()


def test_lease_expiry_frees_and_request_resumes(
    gloo: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    cluster, rec = gloo
    rec.handoffs.clear()
    prompt = prompt_of(40, 400)  # 25 prefill chunks: the handoff stays open for a while
    ledger = cluster.ledger
    skew = [0.0]
    ledger.clock = lambda: time.monotonic() + skew[0]
    # The prefill is progressing, which renews its lease: stop renewals to end it anyway.
    ledger.renew = lambda handoff_ids: None  # type: ignore[method-assign]

    async def run() -> list[int]:
        task = asyncio.ensure_future(collect(cluster, "lease", prompt))
        while not ledger.live() and not task.done():
            await asyncio.sleep(0.001)
        skew[0] = 1000.0  # the lease of the open, unacknowledged handoff is over
        # Ended now, in the loop turn that saw it open (its prefill not even submitted), not at
        # the next housekeeping tick: on a starved loop a tiny model's prefill can finish within
        # one tick, and its first token (which renews the lease, on the skewed clock) or its
        # commit would then reach the cluster before the tick, and no lease would end.
        cluster.events.end_expired_leases()
        skew[0] = 0.0
        return await task

    try:
        assert loop_thread.run(run()) == reference(prompt)
    finally:
        ledger.clock = time.monotonic
        del ledger.renew  # back to the class's method
    assert rec.outcomes()[0] == "lease_expired" and rec.outcomes()[-1] == "ok"
    wait_idle(cluster)


def test_decode_killed_mid_generation(
    gloo: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    cluster, _ = gloo
    prompt = prompt_of(41, 20)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    victim = cluster.controller.workers["decode-0"]
    incarnation = victim.incarnation

    async def run() -> tuple[list[int], int]:
        toks: list[int] = []
        at_kill = -1
        async for d in cluster.generate(GenerateRequest("kill-d", tuple(prompt), params)):
            toks += d.token_ids
            if at_kill < 0 and len(toks) >= 4:
                at_kill = len(toks)
                ray.kill(victim.actor)
        return toks, at_kill

    toks, at_kill = loop_thread.run(run())
    assert 4 <= at_kill < 40
    assert toks == reference(prompt, params)  # nothing lost, nothing duplicated
    assert victim.incarnation == incarnation + 1
    wait_idle(cluster)


def test_prefill_killed_mid_prefill(
    gloo: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    cluster, _ = gloo
    prompt = prompt_of(42, 400)  # 25 chunks of 16 tokens
    victim = cluster.controller.workers["prefill-0"]
    incarnation = victim.incarnation

    async def run() -> tuple[list[int], int]:
        toks: list[int] = []
        gen = cluster.generate(GenerateRequest("kill-p", tuple(prompt), GREEDY))
        first = asyncio.ensure_future(gen.__anext__())
        deadline = time.monotonic() + 30
        while not (victim.stats and victim.stats.pending_prefill_tokens > 0):
            assert time.monotonic() < deadline, "the prefill never showed up"
            await asyncio.sleep(0.001)
        ray.kill(victim.actor)
        killed_after = 0 if not first.done() else 1
        toks += (await first).token_ids
        async for d in gen:
            toks += d.token_ids
        return toks, killed_after

    toks, killed_after = loop_thread.run(run())
    assert killed_after == 0  # no token had come out: the prefill was cut short
    assert toks == reference(prompt)
    assert victim.incarnation == incarnation + 1
    wait_idle(cluster)


def test_role_change_keeps_weights(
    gloo: tuple[Cluster, Recorder], loop_thread: LoopThread, reference: Any
) -> None:
    cluster, _ = gloo
    w = cluster.controller.workers["decode-0"]
    # A request first, so the engine has stepped whichever tests ran before (or none).
    warm = prompt_of(44, 10)
    assert loop_thread.run(collect(cluster, "role-warm", warm)) == reference(warm)
    steps = ray.get(w.actor.stats.remote()).steps
    incarnation = w.incarnation
    loop_thread.run(cluster.controller.set_role("decode-0", "mixed"))
    info = {x.name: x for x in cluster.server_info().workers}
    assert info["decode-0"].role == "mixed" and info["decode-0"].pool == "decode"
    loop_thread.run(cluster.controller.set_role("decode-0", "decode"))
    # Same actor, same engine: its step counter was not reset by a reload.
    assert w.incarnation == incarnation and ray.get(w.actor.stats.remote()).steps >= steps > 0
    prompt = prompt_of(43, 10)
    assert loop_thread.run(collect(cluster, "role", prompt)) == reference(prompt)


def test_mixed_pool_only(
    ray_cluster: str, loop_thread: LoopThread, model: str, reference: Any
) -> None:
    mixed = PoolConfig(
        name="mixed", role="mixed", replicas=2, num_cpus=0.5, resources={"decode_node": 1}
    )
    cluster, rec = make(ray_cluster, loop_thread, model=model, pools=(mixed,))
    try:
        prompts = [prompt_of(50 + i, 5 + 7 * i) for i in range(6)]

        async def run() -> list[list[int]]:
            return await asyncio.gather(
                *(collect(cluster, f"m{i}", p) for i, p in enumerate(prompts))
            )

        assert loop_thread.run(run()) == [reference(p) for p in prompts]
        assert rec.handoffs == []  # mixed workers run both phases in place
        assert cluster.ready()
        wait_idle(cluster)
    finally:
        loop_thread.run(cluster.shutdown())


def test_disaggregated_object_store(
    ray_cluster: str, loop_thread: LoopThread, model: str, reference: Any
) -> None:
    cluster, rec = make(
        ray_cluster,
        loop_thread,
        model=model,
        kv_transfer=KVTransferConfig(transport="object_store"),
    )
    try:
        prompts = [prompt_of(60 + i, 9 + 13 * i) for i in range(6)]

        async def run() -> list[list[int]]:
            return await asyncio.gather(
                *(collect(cluster, f"o{i}", p) for i, p in enumerate(prompts))
            )

        assert loop_thread.run(run()) == [reference(p) for p in prompts]
        assert rec.outcomes() == ["ok"] * 6
        wait_idle(cluster)
    finally:
        loop_thread.run(cluster.shutdown())


def test_conditional_disaggregation(
    ray_cluster: str, loop_thread: LoopThread, model: str, reference: Any
) -> None:
    sched = SchedulerConfig(
        conditional_disaggregation=True,
        in_place_max_tokens=16,
        mixed_pool=MixedPoolConfig(enabled=False),
    )
    cluster, rec = make(ray_cluster, loop_thread, model=model, scheduler=sched)
    try:
        short = [prompt_of(70 + i, 8 + i) for i in range(3)]  # prefilled in place on decode
        long = [prompt_of(80 + i, 40 + i) for i in range(3)]  # handed off

        async def run() -> list[list[int]]:
            return await asyncio.gather(
                *(collect(cluster, f"c{i}", p) for i, p in enumerate(short + long))
            )

        assert loop_thread.run(run()) == [reference(p) for p in short + long]
        assert rec.outcomes() == ["ok"] * len(long)
        wait_idle(cluster)
        # The decode worker now caches the long prompts it imported: a prompt sharing one of
        # them as prefix has little left to compute there, so it is prefilled in place.
        time.sleep(0.6)  # the workers' cached-prefix reports refresh every 0.25 s
        again = [*long[0], 5, 6, 7]

        async def cached() -> tuple[list[int], int]:
            toks: list[int] = []
            usage = None
            async for d in cluster.generate(GenerateRequest("c-again", tuple(again), GREEDY)):
                toks += d.token_ids
                usage = d.usage or usage
            assert usage is not None
            return toks, usage.cached_tokens

        toks, cached_tokens = loop_thread.run(cached())
        assert toks == reference(again)
        assert cached_tokens >= 40 and rec.outcomes() == ["ok"] * len(long)  # no new handoff
        wait_idle(cluster)
    finally:
        loop_thread.run(cluster.shutdown())


def test_mixed_pool_borrows_and_returns(
    ray_cluster: str, loop_thread: LoopThread, model: str, reference: Any
) -> None:
    decode2 = PoolConfig(
        name="decode", role="decode", replicas=2, num_cpus=0.5, resources={"decode_node": 1}
    )
    sched = SchedulerConfig(
        conditional_disaggregation=False,
        mixed_pool=MixedPoolConfig(
            borrow_prefill_tokens=300, return_prefill_tokens=50, cooldown_s=0
        ),
    )
    cluster, rec = make(
        ray_cluster, loop_thread, model=model, pools=(PREFILL, decode2), scheduler=sched
    )
    try:
        # 1200 prompt tokens at once, four times the borrow threshold, so the pressure is still
        # there when the cluster next rebalances even on a fast machine; then 4 more prompts.
        prompts = [prompt_of(90 + i, 150) for i in range(12)]

        async def run() -> list[list[int]]:
            first = [
                asyncio.ensure_future(collect(cluster, f"x{i}", p))
                for i, p in enumerate(prompts[:8])
            ]
            # Prefill pressure: the pool lends a decode worker to the mixed pool...
            deadline = time.monotonic() + 60
            while not any(c.change == "borrow" for c in rec.pool_changes):
                assert time.monotonic() < deadline, "no borrow under prefill pressure"
                await asyncio.sleep(0.01)
            # ...which takes new prompts itself (in place, no handoff).
            rest = [
                asyncio.ensure_future(collect(cluster, f"y{i}", p))
                for i, p in enumerate(prompts[8:])
            ]
            return list(await asyncio.gather(*first, *rest))

        assert loop_thread.run(run()) == [reference(p) for p in prompts]
        deadline = time.monotonic() + 10
        while not any(c.change == "return" for c in rec.pool_changes):
            assert time.monotonic() < deadline, rec.pool_changes
            time.sleep(0.05)
        borrow = next(c for c in rec.pool_changes if c.change == "borrow")
        assert (borrow.pool, borrow.from_role, borrow.to_role) == ("decode", "decode", "mixed")
        assert len(rec.handoffs) < len(prompts)  # the borrowed worker prefilled some in place
        assert {w.role for w in cluster.server_info().workers} == {"prefill", "decode"}
        wait_idle(cluster)
    finally:
        loop_thread.run(cluster.shutdown())

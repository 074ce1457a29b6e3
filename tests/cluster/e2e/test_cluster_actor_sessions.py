"""The cluster actor's router sessions over the fake cluster (no Ray): batched polls deliver
every stream's deltas, refusals come back typed, and a router that stops reading has its
requests aborted by the read lease (a stalled one that comes back finds them ended)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from testkit.fakes import FakeCluster

from batonserve.cluster.api import GenerateRequest, ModelInfo, TokenDelta
from batonserve.cluster.cluster_actor import ClusterActor, StreamError
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.tokenizer import Tokenizer

INFO = ModelInfo("fake", "scripted", 4096, 512, False)


def actor(**kw: object) -> tuple[ClusterActor, FakeCluster]:
    tok = Tokenizer.from_model_dir(resolve_model_dir("demo"))
    assert tok is not None
    fake = FakeCluster(INFO, tok, lambda r: list(range(10, 10 + r.sampling.max_tokens)))
    fake.config = dataclasses.replace(fake.config, **kw)  # type: ignore[arg-type]
    a = ClusterActor(read_lease_s=0.3)
    a.cluster = fake
    a.watch_leases()
    return a, fake


def request(rid: str, n: int = 6) -> GenerateRequest:
    return GenerateRequest(rid, (1, 2, 3, 4), SamplingParams(max_tokens=n))


async def read_all(a: ClusterActor, router: str, rids: set[str]) -> dict[str, list[object]]:
    """Poll until every request in `rids` ended; every item per request, in order."""
    got: dict[str, list[object]] = {r: [] for r in rids}
    open_ = set(rids)
    while open_:
        batch = await a.poll(router, 0.2)
        for rid, items in batch.items.items():
            got[rid] += items
            last = items[-1]
            if isinstance(last, StreamError) or (
                isinstance(last, TokenDelta) and last.finish_reason is not None
            ):
                open_.discard(rid)
    return got


def test_two_routers_streams_in_batched_polls() -> None:
    async def body() -> None:
        a, fake = actor(tokens_per_delta=2)
        for router in ("r1", "r2"):
            for i in range(3):
                assert await a.submit(router, request(f"{router}:{i}", 5 + i)) is None
        for router in ("r1", "r2"):
            got = await read_all(a, router, {f"{router}:{i}" for i in range(3)})
            for i in range(3):
                deltas = got[f"{router}:{i}"]
                toks = [t for d in deltas for t in d.token_ids]  # type: ignore[attr-defined]
                assert toks == list(range(10, 15 + i))
                assert deltas[-1].finish_reason == "length"  # type: ignore[attr-defined]
        assert fake.used_blocks == 0 and a.sessions() == {"r1": 0, "r2": 0}

    asyncio.run(body())


def test_refusals_come_back_typed() -> None:
    async def body() -> None:
        a, fake = actor(max_running=1, token_interval_s=0.05)
        assert await a.submit("r1", request("r1:a", 20)) is None
        err = await a.submit("r1", request("r1:b"))
        assert err is not None and err.kind == "rejected" and "running" in err.message
        fake.config = dataclasses.replace(fake.config, ready=False)
        err = await a.submit("r1", request("r1:c"))
        assert err is not None and err.kind == "unavailable"
        await a.abort("r1", "r1:a")
        assert fake.used_blocks == 0 and fake.aborted == ["r1:a"]

    asyncio.run(body())


@pytest.mark.parametrize("comes_back", [False, True])
def test_a_router_that_stops_reading_loses_its_requests(comes_back: bool) -> None:
    async def body() -> None:
        a, fake = actor(token_interval_s=0.05)
        assert await a.submit("dead", request("dead:1", 200)) is None
        assert await a.submit("alive", request("alive:1", 12)) is None
        alive = asyncio.ensure_future(read_all(a, "alive", {"alive:1"}))
        await asyncio.sleep(1.0)  # > the 0.3 s lease, while "alive" keeps polling
        assert fake.aborted == ["dead:1"] and "dead:1" not in fake.running
        got = await alive
        assert [t for d in got["alive:1"] for t in d.token_ids] == list(range(10, 22))  # type: ignore[attr-defined]
        assert fake.used_blocks == 0
        if comes_back:  # only stalled: its stream ends with the reason, never hangs
            items = (await a.poll("dead", 0.1)).items["dead:1"]
            assert isinstance(items[-1], StreamError) and items[-1].kind == "unavailable"
            assert "stopped reading" in items[-1].message

    asyncio.run(body())


def test_leave_aborts_what_the_router_still_has() -> None:
    async def body() -> None:
        a, fake = actor(token_interval_s=0.05)
        for i in range(3):
            assert await a.submit("r", request(f"r:{i}", 30)) is None
        await a.leave("r")
        assert sorted(fake.aborted) == ["r:0", "r:1", "r:2"] and fake.used_blocks == 0
        assert a.sessions() == {}

    asyncio.run(body())

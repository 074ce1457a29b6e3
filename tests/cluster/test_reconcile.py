"""The reconcile decisions and the config re-read, without Ray: which workers start, which drain,
what a new config may change live (the live behaviour is in runtime/test_elastic.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

from batonserve.cluster.config import PoolConfig, ServeConfig, load_config
from batonserve.cluster.config_watch import ConfigWatcher, live_change
from batonserve.cluster.controller import Controller
from batonserve.cluster.handoff import HandoffLedger
from batonserve.cluster.reconcile import Reconciler
from batonserve.cluster.schema import to_dict
from batonserve.workers.kv_transfer.config import KVTransferConfig
from batonserve.workers.worker_types import WorkerStats

POOLS = (
    PoolConfig(name="prefill", role="prefill", replicas=2, max_replicas=6),
    PoolConfig(name="decode", role="decode", replicas=3, min_replicas=2),
)


class FakeCluster:
    """What the reconciler reads of the Cluster; spawned coroutines are recorded, not run."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._closing = False
        self._views: dict[str, Any] = {}
        self.requests: dict[str, Any] = {}
        self.ledger = HandoffLedger(10.0)
        self.spawned: list[str] = []

    def spawn(self, coro: Any) -> Any:
        self.spawned.append(coro.__qualname__)
        coro.close()
        return _Task()


class _Task:
    def cancel(self) -> None:
        pass


def _stats(name: str, running: int, kv: float) -> WorkerStats:
    return WorkerStats(
        name, "decode", "decode", True, running, 0, 0, 0, 10, 10, 16, kv, 0, 0, 1, 0, 0
    )


def _setup(pools: tuple[PoolConfig, ...] = POOLS) -> tuple[Controller, FakeCluster, Reconciler]:
    ctl = Controller(ServeConfig(model="scripted", pools=pools), "scripted", KVTransferConfig())
    for h in ctl.workers.values():
        h.healthy = True
    cl = FakeCluster(ctl)
    return ctl, cl, Reconciler(cl, 120.0)  # type: ignore[arg-type]


def test_set_replicas_checks_its_bounds() -> None:
    ctl, _, _ = _setup()
    with pytest.raises(ValueError, match="no pool named 'mixed'"):
        ctl.set_replicas("mixed", 2)
    with pytest.raises(ValueError, match="never drained"):
        ctl.set_replicas("prefill", 0)
    with pytest.raises(ValueError, match="min_replicas 2"):
        ctl.set_replicas("decode", 1)
    with pytest.raises(ValueError, match="above max_replicas 6"):
        ctl.set_replicas("prefill", 7)
    with pytest.raises(ValueError, match="expected an integer"):
        ctl.set_replicas("prefill", 2.0)  # type: ignore[arg-type]
    assert ctl.desired == {"prefill": 2, "decode": 3}


def test_growing_starts_pending_workers_under_new_names() -> None:
    ctl, _, rec = _setup()
    ctl.set_replicas("prefill", 4)
    rec.step()
    assert sorted(ctl.pending) == ["prefill-2", "prefill-3"]
    rec.step()  # already pending: nothing more
    assert sorted(ctl.pending) == ["prefill-2", "prefill-3"]
    ctl.set_replicas("prefill", 3)
    rec.step()  # the pending one with the newest name is cancelled; nothing drains
    assert sorted(ctl.pending) == ["prefill-2"] and not rec.drains
    ctl.set_replicas("prefill", 4)
    rec.step()
    assert sorted(ctl.pending) == ["prefill-2", "prefill-4"]  # a name is never reused


def test_shrinking_drains_the_least_loaded_never_the_last() -> None:
    rng = random.Random(5)
    for _ in range(50):
        n = rng.randrange(2, 6)
        pools = (POOLS[0], PoolConfig(name="decode", role="decode", replicas=n))
        ctl, _, rec = _setup(pools)
        loads = {f"decode-{i}": (rng.randrange(0, 4), rng.random()) for i in range(n)}
        for name, (running, kv) in loads.items():
            ctl.workers[name].stats = _stats(name, running, kv)
        dead = rng.choice([None, *loads])
        if dead is not None:
            ctl.workers[dead].healthy = False  # being replaced: counts toward the size
        want = rng.randrange(1, n)
        ctl.set_replicas("decode", want)
        rec.step()
        draining = sorted(h.name for h in ctl.workers.values() if h.draining)
        serving = [h for h in ctl.workers.values() if h.healthy and not h.draining]
        assert len(serving) >= 1
        extra = n - want
        if dead is not None:  # a worker waiting for its replacement goes first
            assert dead in draining
            draining.remove(dead)
            extra -= 1
        alive = sorted((v, k) for k, v in loads.items() if k != dead)
        k = min(extra, len(alive) - 1)
        assert len(draining) == k
        assert sorted(name for _, name in alive[:k]) == draining  # the least loaded ones


def test_ring_members_are_never_drained() -> None:
    from batonserve.workers.sp_serving.config import SequenceParallelConfig

    pools = (PoolConfig(name="prefill", role="prefill", replicas=3), POOLS[1])
    cfg = ServeConfig(
        model="scripted", pools=pools, sequence_parallel=SequenceParallelConfig(enabled=True)
    )
    ctl = Controller(cfg, "scripted", KVTransferConfig())
    for h in ctl.workers.values():
        h.healthy = True
    rec = Reconciler(FakeCluster(ctl), cfg.ray.drain_timeout_s)  # type: ignore[arg-type]
    assert ctl.ring is not None
    ctl.set_replicas("prefill", 1)
    rec.step()
    draining = {h.name for h in ctl.workers.values() if h.draining}
    assert not draining & set(ctl.ring.members)


def test_live_change_is_replicas_only() -> None:
    a = ServeConfig(pools=POOLS)
    b = dataclasses.replace(a, pools=(dataclasses.replace(POOLS[0], replicas=5), POOLS[1]))
    assert live_change(a, b) == ({"prefill": 5}, [])
    c = dataclasses.replace(b, pools=(dataclasses.replace(b.pools[0], num_cpus=3.0), POOLS[1]))
    assert live_change(a, c) == ({}, ["pools[0].num_cpus"])
    d = dataclasses.replace(a, model="other")
    assert live_change(a, d) == ({}, ["model"])
    e = dataclasses.replace(a, pools=POOLS[:1])
    assert live_change(a, e)[1] == ["pools"]


def test_watcher_applies_replicas_and_refuses_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batonserve.config_watch")
    path = tmp_path / "config.yaml"
    cfg = ServeConfig(pools=POOLS)
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    applied: list[tuple[str, int]] = []

    def apply(pool: str, n: int) -> None:
        if n > 6:
            raise ValueError(f"replicas of pool {pool!r}: {n} is above max_replicas 6")
        applied.append((pool, n))

    w = ConfigWatcher(lambda: load_config(path), cfg, apply)

    def write(edit: Any) -> None:
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data))

    def check() -> None:
        asyncio.run(w.check())

    check()
    assert applied == []
    write(lambda d: d["pools"][1].update(replicas=4))
    check()
    check()  # applied once: the running config follows
    assert applied == [("decode", 4)] and w.running.pools[1].replicas == 4
    write(lambda d: d["engine"].update(max_num_seqs=3))
    check()
    check()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("engine.max_num_seqs" in m and "restart" in m for m in msgs) == 1  # said once
    write(lambda d: d["engine"].update(max_num_seqs=cfg.engine.max_num_seqs))
    write(lambda d: d["pools"][0].update(replicas=9))
    check()
    assert applied == [("decode", 4)]
    assert any("above max_replicas 6" in r.getMessage() for r in caplog.records)
    path.write_text("pools: [")  # half-written: keep serving
    check()
    assert any("re-read failed" in r.getMessage() for r in caplog.records)
    assert w.running.pools[1].replicas == 4


def test_serve_watches_its_config_file(tmp_path: Path) -> None:
    """`batonserve serve --config FILE` wraps its cluster factory with the watcher."""
    from batonserve.cluster.config_watch import watching

    path = tmp_path / "config.yaml"
    cfg = ServeConfig(pools=POOLS)
    path.write_text(yaml.safe_dump(to_dict(cfg)))

    class Cluster:
        def __init__(self) -> None:
            self.asked: list[tuple[str, int]] = []

        def set_replicas(self, pool: str, n: int) -> None:
            self.asked.append((pool, n))

    async def factory(config: ServeConfig, progress: Any) -> Cluster:
        return Cluster()

    async def run() -> list[tuple[str, int]]:
        start = watching(factory, lambda: load_config(path), period=0.01)
        cluster = await start(cfg, print)
        data = yaml.safe_load(path.read_text())
        data["pools"][0]["replicas"] = 3
        path.write_text(yaml.safe_dump(data))
        for _ in range(500):
            if cluster.asked:
                break
            await asyncio.sleep(0.01)
        return cluster.asked

    assert asyncio.run(run()) == [("prefill", 3)]


def test_the_newest_pending_worker_is_cancelled_first_by_number() -> None:
    ctl, _, rec = _setup(
        (PoolConfig(name="prefill", role="prefill", replicas=9), POOLS[1])  # prefill-0..8
    )
    ctl.set_replicas("prefill", 11)
    rec.step()
    assert sorted(ctl.pending) == ["prefill-10", "prefill-9"]
    ctl.set_replicas("prefill", 10)
    rec.step()
    assert list(ctl.pending) == ["prefill-9"]  # prefill-10 is the newer, not prefill-9


@pytest.mark.parametrize("key", ["drain_timeout_s", "worker_start_timeout_s"])
def test_ray_clocks_must_be_positive(key: str) -> None:
    from batonserve.cluster.schema import ConfigError, from_dict

    with pytest.raises(ConfigError, match=f"ray.{key}: must be > 0"):
        from_dict(ServeConfig, {"model": "demo", "ray": {key: 0}})

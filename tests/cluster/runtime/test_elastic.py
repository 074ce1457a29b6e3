"""The elastic controller on a live Ray cluster (every node on 127.0.0.1) of scripted workers.

One decode worker fits a decode node (resource `decode_node: 1`), so nodes joining and leaving
are what KubeRay scaling a worker group does. Under load of concurrent greedy streams:
(a) a pool that wants more workers than fit keeps one pending; a node joins, the worker starts
    there, pairs (KV channels to the existing workers) and serves;
(b) a pool scaled down drains a worker: no new pairings, its streams finish, then it is removed
    and its KV channels closed;
(c) a node removed: its worker dies, its streams resume elsewhere, and the pool is back at its
    desired size once a node returns;
(d) the config file re-read changes the desired replicas.
Every stream must end with the tokens an undisturbed scripted engine gives; afterwards every
block pool is empty and no handoff is open.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from testkit.cluster_checks import collect, idle, prompt_of
from testkit.loop_thread import LoopThread
from testkit.observer_recorder import Recorder
from testkit.scripted_reference import scripted_reference

from batonserve.cluster import controller
from batonserve.cluster.config import PoolConfig, RayConfig, ServeConfig, load_config
from batonserve.cluster.config_watch import ConfigWatcher
from batonserve.cluster.runtime import Cluster, start_cluster
from batonserve.cluster.scheduling import MixedPoolConfig, Pairing, SchedulerConfig
from batonserve.cluster.scheduling.decision_log import DecisionRecord
from batonserve.cluster.schema import to_dict
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

pytestmark = pytest.mark.cluster

PREFILL = PoolConfig(name="prefill", role="prefill", num_cpus=0.25, resources={"prefill_node": 1})
DECODE = PoolConfig(name="decode", role="decode", num_cpus=0.25, resources={"decode_node": 1})
# Every request is handed off prefill -> decode, so every decode worker takes pairings.
DISAGGREGATED = SchedulerConfig(
    conditional_disaggregation=False, mixed_pool=MixedPoolConfig(enabled=False)
)
SCRIPTED = ScriptedEngineConfig(num_blocks=512, layer_delay_s=0.004)
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
STREAMS = 16
_SEQ = itertools.count()


class Nodes:
    """The Ray cluster: a head (prefill) and decode nodes that tests add and remove."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster as RayCluster

        self.ray = RayCluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "resources": {"prefill_node": 8},
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
            },
        )
        self.decode: list[Any] = []
        self.add_decode()
        ray.init(address=self.ray.address, _node_ip_address="127.0.0.1", logging_level="WARNING")

    def add_decode(self) -> Any:
        """One more node with room for one decode worker."""
        node = self.ray.add_node(
            num_cpus=1, resources={"decode_node": 1}, node_ip_address="127.0.0.1"
        )
        self.decode.append(node)
        return node

    def remove_decode(self, node: Any) -> None:
        """Take a decode node away (its workers die with it)."""
        self.decode.remove(node)
        self.ray.remove_node(node)

    def back_to_one(self) -> None:
        """The baseline layout for the next test: one decode node."""
        while len(self.decode) > 1:
            self.remove_decode(self.decode[-1])

    def shutdown(self) -> None:
        ray.shutdown()
        self.ray.shutdown()


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    n = Nodes()
    yield n
    n.shutdown()


class Decisions:
    """Every pairing the cluster-level scheduler makes."""

    def __init__(self) -> None:
        self.pairings: list[Pairing] = []

    def record(self, rec: DecisionRecord) -> None:
        if isinstance(rec.decision, Pairing):
            self.pairings.append(rec.decision)


@pytest.fixture
def started(nodes: Nodes, loop_thread: LoopThread) -> Iterator[list[Cluster]]:
    """Clusters a test starts; shut down after it, and the nodes back to the baseline."""
    out: list[Cluster] = []
    yield out
    for c in out:
        loop_thread.run(c.shutdown())
    nodes.back_to_one()


def _config(decode_replicas: int = 1) -> ServeConfig:
    return ServeConfig(
        model="scripted",
        ray=RayConfig(address="auto", namespace=f"elastic-{next(_SEQ)}"),
        pools=(PREFILL, dataclasses.replace(DECODE, replicas=decode_replicas)),
        scheduler=DISAGGREGATED,
    )


def _start(
    loop: LoopThread, started: list[Cluster], cfg: ServeConfig
) -> tuple[Cluster, Decisions, Recorder]:
    rec = Recorder()
    cluster = loop.run(
        start_cluster(cfg, lambda _: None, scripted=SCRIPTED, observer=rec), timeout=180
    )
    started.append(cluster)
    dec = Decisions()
    cluster.cls.recorder = dec
    return cluster, dec, rec


async def _wait(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


def wait(loop: LoopThread, cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait on the cluster's loop (cluster state is only read there)."""
    loop.run(_wait(cond, what, timeout), timeout=timeout + 10)


def call(loop: LoopThread, fn: Callable[..., Any], *args: Any) -> Any:
    """Call `fn` on the cluster's event loop (where set_replicas must run)."""

    async def run() -> Any:
        return fn(*args)

    return loop.run(run())


def under_load(
    loop: LoopThread,
    cluster: Cluster,
    tag: str,
    action: Callable[[], None] = lambda: None,
    streams: int = STREAMS,
    start: int = 0,
    params: SamplingParams = PARAMS,
) -> tuple[list[list[int]], list[list[int]]]:
    """`streams` concurrent greedy streams; `action` runs (on this, the main thread: Ray adds
    and removes nodes only there) once the first tokens have come. Returns (outputs, prompts)."""
    prompts = [prompt_of(start + i, 6 + (i * 7) % 40) for i in range(streams)]

    async def all_streams() -> list[list[int]]:
        streams = (collect(cluster, f"{tag}{i}", p, params) for i, p in enumerate(prompts))
        return list(await asyncio.gather(*streams))

    fut = asyncio.run_coroutine_threadsafe(all_streams(), loop.loop)
    wait(loop, lambda: fut.done() or any(st.produced for st in cluster.requests.values()), "tokens")
    action()
    return fut.result(240), prompts


def _settle(cluster: Cluster, loop: LoopThread, timeout: float = 60) -> None:
    """Pools at their desired size, nothing pending or draining, and the cluster idle."""
    wait(loop, lambda: cluster.reconciler.settled() and idle(cluster), "a settled cluster", timeout)


def _decode_names(cluster: Cluster) -> list[str]:
    return sorted(n for n, h in cluster.controller.workers.items() if h.spec.pool == "decode")


def test_a_pending_worker_starts_on_a_node_that_joins_and_serves(
    nodes: Nodes,
    loop_thread: LoopThread,
    started: list[Cluster],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cluster, dec, _ = _start(loop_thread, started, _config(decode_replicas=1))
    ctl = cluster.controller
    monkeypatch.setattr(controller, "PROGRESS_S", 0.5)  # the pending worker's log, sooner
    caplog.set_level(logging.INFO, logger="batonserve.controller")
    call(loop_thread, cluster.set_replicas, "decode", 2)  # no node has room for a second one
    wait(loop_thread, lambda: bool(ctl.pending), "a pending decode worker")
    [name] = ctl.pending
    time.sleep(2.0)
    assert name in ctl.pending and name not in ctl.workers  # pending, not failed
    said = [r.getMessage() for r in caplog.records if f"worker {name} pending" in r.getMessage()]
    assert said and "decode_node=1" in said[-1], said  # why: what it asks, what Ray has free

    def grow() -> None:
        nodes.add_decode()  # KubeRay scaled the group up
        wait(loop_thread, lambda: name in ctl.workers and ctl.workers[name].healthy, name, 90)

    outs, prompts = under_load(loop_thread, cluster, "a", grow)
    assert outs == scripted_reference(SCRIPTED, prompts, PARAMS)
    # New streams after the join: the least loaded decode worker (the new one) gets some.
    outs, prompts = under_load(loop_thread, cluster, "a2-", start=100)
    assert outs == scripted_reference(SCRIPTED, prompts, PARAMS)
    assert any(p.decode_worker == name for p in dec.pairings), "the new worker was never paired"
    if cluster.kv.transport == "torch_dist":
        assert ("prefill-0", name) in ctl._channels  # a KV channel to an existing worker
    assert _decode_names(cluster) == ["decode-0", name]
    _settle(cluster, loop_thread)


def test_b_scale_down_under_load_drains_first(
    nodes: Nodes, loop_thread: LoopThread, started: list[Cluster]
) -> None:
    nodes.add_decode()
    cluster, dec, rec = _start(loop_thread, started, _config(decode_replicas=2))
    ctl = cluster.controller
    assert _decode_names(cluster) == ["decode-0", "decode-1"]
    drained: list[str] = []
    busy: list[int] = []
    paired_after: list[Pairing] = []

    def shrink() -> None:
        n_before = len(dec.pairings)
        cluster.set_replicas("decode", 1)  # from another thread (as an actor method may)
        wait(loop_thread, lambda: bool(cluster.reconciler.drains), "a drain to start", 10)
        [name] = cluster.reconciler.drains
        drained.append(name)
        busy.append(call(loop_thread, lambda: len(cluster.reconciler._using(name))))
        # Streams that arrive during the drain avoid it.
        extra, extra_prompts = under_load(loop_thread, cluster, "b2-", streams=4, start=200)
        assert extra == scripted_reference(SCRIPTED, extra_prompts, PARAMS)
        paired_after.extend(dec.pairings[n_before:])

    outs, prompts = under_load(loop_thread, cluster, "b", shrink)
    assert outs == scripted_reference(SCRIPTED, prompts, PARAMS)  # nothing lost or changed
    [name] = drained
    assert busy[0] > 0  # it was serving when its drain began ...
    assert set(rec.outcomes()) == {"ok"}  # ... and no request was moved: they finished there
    assert paired_after and all(
        name not in (p.prefill_worker, p.decode_worker) for p in paired_after
    )
    _settle(cluster, loop_thread)
    assert name not in ctl.workers and len(_decode_names(cluster)) == 1
    assert not any(name in c for c in ctl._channels)  # its KV channels are gone
    with pytest.raises(ValueError):
        ray.get_actor(name, namespace=ctl.namespace)  # the actor is gone


def test_b_drain_past_its_bound_moves_the_rest(
    nodes: Nodes, loop_thread: LoopThread, started: list[Cluster], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batonserve")
    nodes.add_decode()
    cluster, _, _ = _start(loop_thread, started, _config(decode_replicas=2))
    cluster.reconciler.drain_timeout_s = 0.2  # far shorter than the streams
    moved: list[int] = []

    def shrink() -> None:
        call(loop_thread, cluster.set_replicas, "decode", 1)
        wait(loop_thread, lambda: bool(cluster.reconciler.drains), "a drain to start", 10)
        [name] = cluster.reconciler.drains
        moved.append(call(loop_thread, lambda: len(cluster.reconciler._using(name))))

    long = dataclasses.replace(PARAMS, max_tokens=64)
    outs, prompts = under_load(loop_thread, cluster, "bt", shrink, params=long)
    assert moved[0] > 0  # requests were still running at the bound ...
    assert outs == scripted_reference(SCRIPTED, prompts, long)  # ... moved with no token lost
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "still running after 0.2s; moving them" in said
    assert "resuming bt" in said  # through the resume path
    _settle(cluster, loop_thread)
    assert len(_decode_names(cluster)) == 1


def test_c_node_removed_under_load_then_capacity_returns(
    nodes: Nodes, loop_thread: LoopThread, started: list[Cluster]
) -> None:
    nodes.add_decode()
    cluster, _, _ = _start(loop_thread, started, _config(decode_replicas=2))
    ctl = cluster.controller
    victim = ctl.workers["decode-1"]
    incarnation = victim.incarnation
    busy: list[int] = []

    def lose_node() -> None:
        busy.append(call(loop_thread, lambda: len(cluster.reconciler._using("decode-1"))))
        node = next(n for n in nodes.decode if n.node_id == _node_of(victim.actor))
        nodes.remove_decode(node)

    outs, prompts = under_load(loop_thread, cluster, "c", lose_node)
    assert outs == scripted_reference(SCRIPTED, prompts, PARAMS)  # resumed, nothing lost
    assert busy[0] > 0  # it died serving
    wait(loop_thread, lambda: victim.incarnation > incarnation, "a replacement to be started")
    time.sleep(1.0)
    assert not victim.healthy  # no node has room: it waits
    nodes.add_decode()
    wait(loop_thread, lambda: victim.healthy, "the replacement on the new node", 90)
    outs, prompts = under_load(loop_thread, cluster, "c2-", start=300)
    assert outs == scripted_reference(SCRIPTED, prompts, PARAMS)
    assert _decode_names(cluster) == ["decode-0", "decode-1"]
    _settle(cluster, loop_thread)


def test_c_node_removed_and_size_lowered_keeps_the_healthy_worker(
    nodes: Nodes, loop_thread: LoopThread, started: list[Cluster]
) -> None:
    # A replicas-only helm upgrade that lowers a group: KubeRay (no autoscaler) deletes a pod of
    # its choosing at once, and the controller learns the lower size from the config after.
    nodes.add_decode()
    cluster, _, _ = _start(loop_thread, started, _config(decode_replicas=2))
    ctl = cluster.controller
    keep, victim = ctl.workers["decode-0"], ctl.workers["decode-1"]
    incarnation = keep.incarnation

    def pod_deleted_then_config() -> None:
        node = next(n for n in nodes.decode if n.node_id == _node_of(victim.actor))
        nodes.remove_decode(node)
        wait(loop_thread, lambda: not victim.healthy, "decode-1 to be seen dead")
        cluster.set_replicas("decode", 1)

    outs, prompts = under_load(loop_thread, cluster, "ce", pod_deleted_then_config, start=500)
    assert outs == scripted_reference(SCRIPTED, prompts, PARAMS)
    _settle(cluster, loop_thread)
    assert _decode_names(cluster) == ["decode-0"]  # the replacement was given up, not drained
    assert keep.healthy and keep.incarnation == incarnation and not keep.draining


def test_d_config_reread_changes_replicas(
    nodes: Nodes, loop_thread: LoopThread, started: list[Cluster], tmp_path: Path
) -> None:
    cfg = _config(decode_replicas=1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    cluster, _, _ = _start(loop_thread, started, load_config(path))
    ctl = cluster.controller
    watcher = ConfigWatcher(lambda: load_config(path), cluster.config, cluster.set_replicas)

    def rewrite(**prefill: Any) -> None:
        data = yaml.safe_load(path.read_text())
        data["pools"][0].update(prefill)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    rewrite(replicas=2)  # the head has room for a second prefill worker
    loop_thread.run(watcher.check())
    assert ctl.desired == {"prefill": 2, "decode": 1}
    _settle(cluster, loop_thread)
    assert sorted(n for n in ctl.workers if n.startswith("prefill")) == ["prefill-0", "prefill-1"]

    rewrite(replicas=1, num_cpus=0.5)  # not live: nothing applied, the replicas neither
    loop_thread.run(watcher.check())
    assert ctl.desired == {"prefill": 2, "decode": 1}

    rewrite(num_cpus=0.25)  # back to a replicas-only change, applied under load
    outs, prompts = under_load(
        loop_thread, cluster, "d", lambda: loop_thread.run(watcher.check()), start=400
    )
    assert outs == scripted_reference(SCRIPTED, prompts, PARAMS)
    assert ctl.desired == {"prefill": 1, "decode": 1}
    _settle(cluster, loop_thread)
    assert len([n for n in ctl.workers if n.startswith("prefill")]) == 1


def _node_of(actor: Any) -> str:
    from ray._private.state import actors

    return str(actors(actor_id=actor._actor_id.hex())["Address"]["NodeID"])

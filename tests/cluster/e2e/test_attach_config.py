"""What an attaching router compares with the running cluster's config (no Ray needed)."""

from __future__ import annotations

from dataclasses import replace

from batonserve.cluster.cluster_actor import config_diff
from batonserve.cluster.config import PoolConfig, RayConfig, RouterConfig, ServeConfig
from batonserve.workers.config import EngineConfig


def test_router_settings_and_ray_address_are_each_routers_own() -> None:
    running = ServeConfig(model="demo", ray=RayConfig(address="10.0.0.1:6379"))
    mine = replace(
        running, router=RouterConfig(port=9001, http_port=0), ray=RayConfig(address="auto")
    )
    assert config_diff(running, mine) == []


def test_every_other_difference_is_named() -> None:
    pools = (PoolConfig("prefill", "prefill"), PoolConfig("decode", "decode"))
    running = ServeConfig(model="demo", pools=pools)
    mine = replace(
        running,
        model="demo-moe",
        engine=EngineConfig(dtype="float32"),
        pools=(pools[0], replace(pools[1], replicas=3)),
        ray=RayConfig(namespace="other"),
    )
    diff = config_diff(running, mine)
    assert sorted(d.split(":")[0] for d in diff) == [
        "engine.dtype",
        "model",
        "ray.namespace",
    ], diff  # replicas are the running cluster's own desired state (scaling changes them)
    assert "pools[1].replicas: running 1, this router 3" in config_diff(running, mine, True)
    fewer = config_diff(running, replace(running, pools=pools[:1]))
    assert len(fewer) == 1 and fewer[0].startswith("pools: running ("), fewer

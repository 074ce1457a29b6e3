"""Helpers of the attach tests: a Ray cluster the test owns, routers attached to it as
`batonserve serve --ray-address` subprocesses, gRPC streams, and checks on the cluster actor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc

from batonserve.proto import generation_pb2 as gpb
from batonserve.proto import generation_pb2_grpc
from testkit.serve_process import Server, serve_config

NAMESPACE = "attach-test"
ENGINE = "engine:\n  dtype: float32\n"  # greedy tokens exactly the offline engine's under batching
POOLS = """pools:
  - {name: prefill, role: prefill, num_cpus: 0.25}
  - {name: decode, role: decode, num_cpus: 0.25}
"""
PROMPTS = ("def fibonacci(n):", "import os\n", "class Foo:", "for i in range(")
MAX_TOKENS = 48


@contextmanager
def owned_ray() -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 (not this process's driver); yields its address."""
    import ray
    from ray.cluster_utils import Cluster

    from batonserve.cluster.env import keep_ray_on_loopback

    keep_ray_on_loopback()  # also when run as a script, without the tests' conftest
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 4, "include_dashboard": False},
    )
    try:
        ray.init(
            address=cluster.address,
            namespace=NAMESPACE,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
            log_to_driver=False,
        )
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def config(folder: Path) -> str:
    """The quiet serve config of these tests: demo model in float32, 1 prefill + 1 decode."""
    ray = f"  namespace: {NAMESPACE}\n"
    return serve_config(folder, ENGINE + POOLS, ray)


def start_router(cfg: str, address: str) -> Server:
    """`batonserve serve --ray-address` (not yet waited for)."""
    return Server(["--config", cfg, "--ray-address", address])


def router_port(server: Server, timeout: float = 300) -> int:
    """Wait for `ready`; the router's gRPC port."""
    server.wait_for(r"batonserve: ready", timeout)
    return int(server.wait_for(r"router listening on 127\.0\.0\.1:(\d+)", 5).group(1))


def cluster_actor() -> Any:
    """The batonserve cluster actor of the test namespace."""
    import ray

    return ray.get_actor("batonserve-cluster", namespace=NAMESPACE)


def worker_ids() -> dict[str, tuple[str, int]]:
    """Each worker's Ray actor id and incarnation, as the cluster actor reports them."""
    import ray

    return dict(ray.get(cluster_actor().identity.remote(), timeout=30)["workers"])


def wait_baseline(timeout: float = 60) -> None:
    """Every block pool back to its baseline: nothing in flight, every block free, no handoff."""
    import ray

    deadline = time.monotonic() + timeout
    snap: dict[str, Any] = {}
    while time.monotonic() < deadline:
        snap = ray.get(cluster_actor().snapshot.remote(), timeout=30)
        if (
            not snap["requests"]
            and not snap["handoffs"]
            and all(
                healthy
                and s is not None
                and s.num_free_blocks == s.num_blocks
                and not (s.pinned or s.imports or s.exports or s.running or s.waiting)
                for healthy, s in snap["workers"].values()
            )
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"pools not back to baseline after {timeout:g}s: {snap}")


async def stream(
    port: int,
    text: str,
    got: list[int] | None = None,
    max_tokens: int = MAX_TOKENS,
    errors: list[str] | None = None,
) -> list[int] | grpc.StatusCode:
    """One greedy stream of `max_tokens`; its tokens, or the status code it ended with.

    `got` (if given) receives the tokens as they come, for a caller watching progress; `errors`
    the message of a status other than OK.
    """
    got = [] if got is None else got
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        req = gpb.GenerateRequest(
            text=text, sampling=gpb.SamplingParams(max_tokens=max_tokens, temperature=0)
        )
        try:
            async for msg in stub.Generate(req, timeout=120):
                got += msg.token_ids
        except grpc.aio.AioRpcError as e:
            if errors is not None:
                errors.append(e.details() or "")
            return e.code()
    return got


def expected_tokens() -> list[list[int]]:
    """The offline engine's greedy tokens for PROMPTS (float32, like the served workers)."""
    from batonserve.workers.config import EngineConfig
    from batonserve.workers.engine import Engine
    from batonserve.workers.sampling_params import SamplingParams

    engine = Engine("demo", EngineConfig(dtype="float32"))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return [list(o.token_ids) for o in engine.generate(list(PROMPTS), params)]


def run(coro: Any) -> Any:
    """asyncio.run for a test body."""
    return asyncio.run(coro)

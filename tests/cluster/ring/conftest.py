"""Ring-serving fixtures: a two-node Ray cluster on 127.0.0.1 and a module-wide event loop."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ (hf_tiny.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))  # runtime_helpers.py
# Ray reads this when it is imported; without it, Ray binds to the machine's external address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from runtime_helpers import LoopThread


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head node with resource `prefill_node` (the ring) and a node with `decode_node`."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"prefill_node": 8},
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
        },
    )
    cluster.add_node(num_cpus=2, resources={"decode_node": 8}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    """The module's event loop."""
    lt = LoopThread()
    yield lt
    lt.close()

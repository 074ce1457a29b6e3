"""A local multi-node Ray cluster for tests, every node on 127.0.0.1 (never the external address)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def two_node_ray(extra_decode_nodes: int = 0) -> Iterator[str]:
    """A head node with resource `prefill_node` and node(s) with `decode_node`; yields the address.

    The test process is connected as the driver, and everything is shut down on exit.
    """
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
    for _ in range(1 + extra_decode_nodes):
        cluster.add_node(num_cpus=2, resources={"decode_node": 8}, node_ip_address="127.0.0.1")
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING")
    try:
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()

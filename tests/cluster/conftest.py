"""Fixtures of the cluster tests: a two-node Ray cluster on 127.0.0.1 and an event-loop thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from testkit.loop_thread import LoopThread
from testkit.ray_local import two_node_ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head node with resource `prefill_node` and a second node with `decode_node`."""
    with two_node_ray() as address:
        yield address


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    """The module's event loop."""
    lt = LoopThread()
    yield lt
    lt.close()

"""Fixtures of the chaos tests: a two-node Ray cluster on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from testkit.ray_local import two_node_ray


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head node with resource `prefill_node` and a second node with `decode_node`."""
    with two_node_ray() as address:
        yield address

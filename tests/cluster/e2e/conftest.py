"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from testkit.router_attach import owned_ray


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray cluster owned by the test module, outliving every router started in it."""
    with owned_ray() as address:
        yield address

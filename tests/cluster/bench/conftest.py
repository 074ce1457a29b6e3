"""Fixtures for `batonserve bench` tests: a router over the fake cluster on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from testkit.router_harness import RouterHarness, router_factory, write_tiny_model

from batonserve.workers.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def bench_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny model's tokenizer."""
    return Tokenizer(write_tiny_model(tmp_path_factory.mktemp("bench-model")) / "tokenizer.json")


@pytest.fixture
def bench_router(bench_tokenizer: Tokenizer) -> Iterator[Callable[..., RouterHarness]]:
    """Factory of routers over the fake cluster; each is closed after the test."""
    with router_factory(bench_tokenizer) as make:
        yield make

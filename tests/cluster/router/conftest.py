"""Fixtures for router tests (helpers live in testkit.router_harness)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from testkit.router_harness import RouterHarness, router_factory, tiny_model_info, write_tiny_model

from batonserve.cluster.api import ModelInfo
from batonserve.workers.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model directory (config.model of the router under test)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    """The tiny model's tokenizer."""
    return Tokenizer(model_dir / "tokenizer.json")


@pytest.fixture(scope="session")
def model_info(tokenizer: Tokenizer) -> ModelInfo:
    """What the fake cluster serves."""
    return tiny_model_info(tokenizer)


@pytest.fixture
def make_router(
    tokenizer: Tokenizer, model_info: ModelInfo
) -> Iterator[Callable[..., RouterHarness]]:
    """Factory of router harnesses; every one is closed after the test."""
    with router_factory(tokenizer, model_info) as make:
        yield make


@pytest.fixture
def router(make_router: Callable[..., RouterHarness]) -> RouterHarness:
    """A router over a default fake cluster."""
    return make_router()

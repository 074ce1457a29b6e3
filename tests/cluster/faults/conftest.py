"""Fixtures for fault tests: routers over the fake cluster (the real-cluster ones set their own)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
from testkit.router_harness import RouterHarness, router_factory, write_tiny_model  # noqa: E402

from batonserve.workers.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def fault_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer-only model directory the fake cluster serves."""
    return write_tiny_model(tmp_path_factory.mktemp("fault-model"))


@pytest.fixture(scope="session")
def fault_tokenizer(fault_model_dir: Path) -> Tokenizer:
    """Its tokenizer."""
    return Tokenizer(fault_model_dir / "tokenizer.json")


@pytest.fixture
def fault_router(fault_tokenizer: Tokenizer) -> Iterator[Callable[..., RouterHarness]]:
    """Factory of routers over the fake cluster; each is closed after the test."""
    with router_factory(fault_tokenizer) as make:
        yield make

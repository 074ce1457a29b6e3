"""Fixtures for `batonserve bench` tests: a router over the fake cluster on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "router"))

from router_harness import CONTEXT_LENGTH, RouterHarness, write_tiny_model

from batonserve.cluster.api import ModelInfo
from batonserve.workers.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def bench_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny model's tokenizer."""
    return Tokenizer(write_tiny_model(tmp_path_factory.mktemp("bench-model")) / "tokenizer.json")


@pytest.fixture
def bench_router(bench_tokenizer: Tokenizer) -> Iterator[Callable[..., RouterHarness]]:
    """Factory of routers over the fake cluster; each is closed after the test."""
    info = ModelInfo("tiny", "LlamaForCausalLM", CONTEXT_LENGTH, bench_tokenizer.vocab_size, False)
    made: list[RouterHarness] = []

    def make(**kwargs: Any) -> RouterHarness:
        h = RouterHarness(bench_tokenizer, info, **kwargs)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()

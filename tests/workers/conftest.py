"""Engine-test fixtures: tiny random HF models (testkit.hf_tiny) built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from testkit.hf_tiny import build_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json of the tiny models' byte-level BPE tokenizer."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_tokenizer().save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_model(arch) -> directory of a tiny random HF model of `arch`, built once per session."""
    from testkit.hf_tiny import make_tiny_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return get

"""Model-test fixtures: tiny random HF models (testkit.hf_tiny), built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def hf_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """hf_tiny_dir(arch, **kw) -> directory of a tiny random HF model, cached per (arch, kw)."""
    from testkit.hf_tiny import make_tiny_model

    built: dict[str, Path] = {}

    def get(arch: str, **kw: object) -> Path:
        key = arch + repr(sorted(kw.items()))
        if key not in built:
            built[key] = make_tiny_model(arch, tmp_path_factory.mktemp(f"hf-{arch}"), **kw)  # type: ignore[arg-type]
        return built[key]

    return get

"""TP-test fixtures: the tiny random HF models every tensor-parallel test shards, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# name -> (testkit.hf_tiny arch, config overrides). Every tiny model has 4 query heads and 2 KV
# heads, so TP=4 replicates KV heads; "llama_mqa_odd" has one KV head and a vocabulary (387) that
# neither 2 nor 4 divides.
CASES: dict[str, tuple[str, dict[str, object]]] = {
    "llama": ("llama", {}),
    "llama_mqa_odd": ("llama", {"num_key_value_heads": 1, "vocab_size": 387}),
    "llama3_rope": ("llama3_rope", {}),
    "llama_tied": ("llama_tied", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
}


@pytest.fixture(scope="session")
def tp_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every case's model directory."""
    from testkit.hf_tiny import make_tiny_model

    return {
        name: make_tiny_model(arch, tmp_path_factory.mktemp(f"tp-{name}"), **kw)  # type: ignore[arg-type]
        for name, (arch, kw) in CASES.items()
    }

"""Run by tests/test_import_hygiene.py as its own pytest session from the repository root."""

import importlib.metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_kernels_is_the_installed_distribution_and_transformers_runs() -> None:
    import kernels  # Hugging Face's, which transformers 5 imports; never the repo's kernels/

    origin = Path(kernels.__file__).resolve()
    assert (REPO / "kernels") not in origin.parents, origin  # (a .venv inside the repo is fine)
    dist = importlib.metadata.distribution("kernels")
    assert origin.is_relative_to(Path(str(dist.locate_file(""))).resolve()), origin

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    out = LlamaForCausalLM(cfg).eval()(torch.tensor([[1, 2, 3]]))
    assert out.logits.shape == (1, 3, 64)

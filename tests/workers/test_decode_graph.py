"""Decode graphs (workers/decode_graph.py): padded bucket runs give the eager engine's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hf_tiny import make_tiny_model

from batonserve.workers.decode_graph import bucket_sizes
from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral (sliding window on: the op's window argument is exercised)."""
    return make_tiny_model("mistral", tmp_path_factory.mktemp("graphs"), num_hidden_layers=2)


def _generate(model_dir: Path, mode: str, prompts: list[list[int]]) -> list[list[int]]:
    engine = Engine.from_model(
        model_dir, dtype="float32", device="cpu", max_num_seqs=6, compile_decode=mode,
        num_kv_blocks=64, block_size=4,
    )
    if mode:
        assert engine.runner.decode_graphs is not None  # type: ignore[attr-defined]
        assert sorted(engine.runner.decode_graphs.runners) == [1, 2, 4, 6]  # type: ignore[attr-defined]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 3, 14, 6, 1)]
    return [o.token_ids for o in engine.generate(prompts, params)]


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]


@pytest.mark.parametrize("mode", ["eager", "inductor"])
def test_padded_graphs_match_eager_greedy_tokens(model_dir: Path, mode: str) -> None:
    """Five requests finishing at different steps run through buckets 4, 2 and 1 (padded rows
    write the scratch block only): the same greedy tokens as the eager engine, in float32."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2)]
    assert _generate(model_dir, mode, prompts) == _generate(model_dir, "", prompts)


def test_unknown_mode_is_an_error(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="compile_decode"):
        Engine.from_model(model_dir, dtype="float32", device="cpu", compile_decode="bogus")

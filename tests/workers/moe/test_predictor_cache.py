"""`batonserve train-predictor` for any MoE model: written to the user cache keyed by the model's
identity, found there by serving; a policy that needs one and finds none names the command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from testkit.hf_tiny import make_tiny_model

from batonserve.cluster.cli import main as cli_main
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.expert_store.decode import greedy_decode
from batonserve.workers.expert_store.predictor_cache import (
    cache_dir,
    find_predictor,
    model_identity,
    predictor_path,
)
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.sampling_params import SamplingParams

PROMPTS = ([5, 17, 301, 42, 9, 100, 77], [3, 5, 6, 7], [8, 222, 33, 44, 55])


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache dir for the test (never the user's)."""
    monkeypatch.delenv("BATONSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "batonserve"


def test_cache_dir_and_identity(cache: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """XDG_CACHE_HOME, then BATONSERVE_CACHE_DIR; identity survives a copy, not a config change."""
    assert cache_dir() == cache
    monkeypatch.setenv("BATONSERVE_CACHE_DIR", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
    a = make_tiny_model("qwen2_moe", tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert model_identity(a) == model_identity(b)
    c = make_tiny_model("qwen2_moe", tmp_path / "c", norm_topk_prob=True)
    assert model_identity(a) != model_identity(c)
    assert "batonserve" not in str(predictor_path(a).relative_to(tmp_path / "own"))


def test_bundled_demo_predictor_still_found(cache: Path) -> None:
    """The bundled demo-moe predictor ships in the package and is found without training."""
    path = find_predictor(resolve_model_dir("demo-moe"))
    assert path is not None and path.name == "demo-moe.safetensors"


def test_train_then_serve_predictive_with_regrouping(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing predictor: the error names the command. After training (Qwen2-MoE), the predictive
    policy with prefetch and token paths serves the same tokens as the all-resident model, and the
    engine regroups decode tokens by the predictor's forecasts with the same tokens."""
    model = make_tiny_model("qwen2_moe", tmp_path / "m")
    cfg = dict(dtype="float32", device="cpu", num_kv_blocks=32, block_size=4)
    with pytest.raises(ValueError, match="batonserve train-predictor --model"):
        ModelRunner(model, EngineConfig(**cfg, expert_cache_policy="predictive"))  # type: ignore[arg-type]
    argv = ["train-predictor", "--model", str(model), "--seed", "3", "--length", "32"]
    assert cli_main([*argv, "--max-chunks", "6", "--steps", "30"]) == 0
    out = capsys.readouterr()
    assert "held-out recall@2:" in out.out and "recorded routing" in out.err
    assert find_predictor(model) == predictor_path(model) and predictor_path(model).is_file()
    assert str(cache) in str(predictor_path(model))

    ref = greedy_decode(ModelRunner(model, EngineConfig(**cfg)), PROMPTS, 6)  # type: ignore[arg-type]
    r = ModelRunner(
        model,
        EngineConfig(
            **cfg,  # type: ignore[arg-type]
            expert_cache_policy="predictive",
            expert_cache_fraction=0.5,
            moe_regroup_batch=2,
        ),
    )
    try:
        got = greedy_decode(r, PROMPTS, 6)
        assert r.expert_store is not None
        r.expert_store.drain()
    finally:
        r.close()
    assert got.tokens == ref.tokens
    assert r.token_paths is not None and len(r.token_paths(PROMPTS[0][0])) > 0
    assert r.expert_store.stats.prefetch_issued > 0

    # Token regrouping in the engine's scheduler (cap 2 of 3 running sequences): same tokens.
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    kw = dict(cfg, num_kv_blocks=64)
    plain = Engine.from_model(model, **kw)  # type: ignore[arg-type]
    grouped = Engine.from_model(model, **kw, moe_regroup_batch=2, moe_regroup_max_wait=4)  # type: ignore[arg-type]
    want = [o.token_ids for o in plain.generate([list(p) for p in PROMPTS], greedy)]
    assert [o.token_ids for o in grouped.generate([list(p) for p in PROMPTS], greedy)] == want
    assert grouped.stats().regroup_deferred > 0

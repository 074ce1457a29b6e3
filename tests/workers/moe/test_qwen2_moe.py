"""Qwen2-MoE: shared expert, norm_topk_prob and dense layers match transformers; the expert store
serves it with the same tokens as the all-resident model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testkit.hf_tiny import load_hf_model, make_tiny_model

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.decode import greedy_decode
from batonserve.workers.model_runner import ModelRunner

PROMPTS = ([5, 17, 301, 42, 9, 100, 77], [3, 5, 6, 7], [8, 222, 33, 44, 55])


def _runner(path: Path, **kw: object) -> ModelRunner:
    cfg = EngineConfig(dtype="float32", device="cpu", num_kv_blocks=32, block_size=4, **kw)  # type: ignore[arg-type]
    return ModelRunner(path, cfg)


@pytest.mark.parametrize(
    "overrides",
    [{"norm_topk_prob": True}, {"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}],
    ids=["norm_topk_prob", "mlp_only_layers", "decoder_sparse_step"],
)
def test_variants_match_hf(tmp_path: Path, overrides: dict[str, object]) -> None:
    """Renormalised top-k weights and dense layers: prefill logits within 1e-4 of transformers."""
    path = make_tiny_model("qwen2_moe", tmp_path / "m", **overrides)
    runner = _runner(path)
    hf = load_hf_model(path)
    prompt = PROMPTS[0]
    res = greedy_decode(runner, [prompt], 6, keep_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].float()
        gen = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(res.logits[0][0], ref, atol=1e-4, rtol=0)
    assert res.tokens[0] == gen[0, len(prompt) :].tolist()


def test_store_serves_qwen2_moe_with_same_tokens(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """LRU store at 25% of expert bytes: same tokens and logits as all-resident; misses read disk."""
    path = tiny_model("qwen2_moe")
    ref = greedy_decode(_runner(path), PROMPTS, 8, keep_logits=True)
    r = _runner(path, expert_cache_policy="lru", expert_cache_fraction=0.25)
    try:
        got = greedy_decode(r, PROMPTS, 8, keep_logits=True)
    finally:
        r.close()
    assert got.tokens == ref.tokens
    for a, b in zip(got.logits, ref.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert r.expert_store is not None
    st = r.expert_store.stats
    assert st.tiers["disk"].hits > 0 and st.peak_resident_bytes <= r.expert_store.fast.budget


def test_store_refuses_dense_layers(tmp_path: Path) -> None:
    """A model with dense layers between MoE layers gets a clear error from the store."""
    path = make_tiny_model("qwen2_moe", tmp_path / "m", mlp_only_layers=[0])
    with pytest.raises(ValueError, match="dense MLP"):
        _runner(path, expert_cache_policy="lru")

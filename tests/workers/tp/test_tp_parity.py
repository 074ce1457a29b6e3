"""Megatron sharding of every architecture: TP=2 and TP=4 logits and greedy tokens equal TP=1's
(and transformers'), each rank reads and holds only its shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from testkit.gloo_ranks import run_ranks
from testkit.hf_tiny import load_hf_model
from testkit.paged_batch import PagedSeqs

from batonserve.workers.config import EngineConfig
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.tp import TPShard, check_tp

TOL = 1e-5  # TP vs TP=1, float32: only the all-reduce's summation order differs
HF_TOL = 1e-5  # vs transformers (eager attention, float32)
PROMPTS = ([5, 17, 33, 9, 120, 7, 64], [200, 3, 44])
DECODE_STEPS = 4


def _config() -> EngineConfig:
    return EngineConfig(dtype="float32", num_kv_blocks=32, block_size=4)


def _run(runner: ModelRunner, steps: int = DECODE_STEPS) -> dict[str, Any]:
    """Prefill both prompts (every row's logits), then `steps` greedy decode steps: logits and
    tokens."""
    seqs = PagedSeqs(block_size=4, num_blocks=32, seed=1)
    ids = [seqs.add() for _ in PROMPTS]
    prefill = runner.execute(seqs.step(dict(zip(ids, PROMPTS, strict=True)), all_logits=True))
    ends = torch.tensor([len(PROMPTS[0]) - 1, len(PROMPTS[0]) + len(PROMPTS[1]) - 1])
    tokens = [prefill[ends].argmax(-1).tolist()]
    decode = []
    for _ in range(steps):
        out = runner.execute(seqs.step({s: [t] for s, t in zip(ids, tokens[-1], strict=True)}))
        decode.append(out)
        tokens.append(out.argmax(-1).tolist())
    return {"prefill": prefill, "decode": torch.stack(decode), "tokens": tokens}


def _shard_run(rank: int, world: int, models: dict[str, str]) -> dict[str, Any]:
    """Rank body: every model at TP=world; logits (rank 0 only) and this rank's bytes."""
    out: dict[str, Any] = {}
    for name, path in models.items():
        runner = ModelRunner(path, _config(), TPShard(rank, world))
        res = _run(runner)
        res["bytes"] = runner.parameter_bytes()
        if rank:
            res = {"bytes": res["bytes"], "tokens": res["tokens"]}
        out[name] = res
    return out


def _expected_rank_bytes(mc: ModelConfig, full: int, world: int, rank: int) -> int:
    """Bytes rank `rank` should hold: 1/N of the split tensors plus the replicated ones."""
    elem = 4  # float32
    d, hid, layers = mc.head_dim, mc.hidden_size, mc.num_layers
    norms = (2 * layers + 1) * hid
    gates = 0  # MoE routers and Qwen2-MoE's shared-expert gate are replicated
    if mc.is_moe:
        moe_layers = layers - len(mc.dense_mlp_layers)
        shared_gate = hid if mc.shared_expert_intermediate_size else 0
        gates = moe_layers * (mc.num_local_experts * hid + shared_gate)
    kv_per_head = layers * 2 * d * (hid + int(mc.attention_bias))  # k and v rows of one head
    kv_all = kv_per_head * mc.num_kv_heads
    tables = 1 if mc.tie_word_embeddings else 2
    vocab_all = tables * mc.vocab_size * hid
    split = full // elem - norms - gates - kv_all - vocab_all
    assert split % world == 0
    kv0, kv1 = TPShard(rank, world).kv_heads(mc.num_kv_heads)
    rows = TPShard(rank, world).vocab(mc.vocab_size)[2]
    return elem * (split // world + norms + gates + kv_per_head * (kv1 - kv0) + tables * rows * hid)


@pytest.fixture(scope="module")
def reference(tp_models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """TP=1 runs (this process) of every model."""
    out = {}
    for name, path in tp_models.items():
        runner = ModelRunner(path, _config())
        out[name] = _run(runner) | {"bytes": runner.parameter_bytes(), "mc": runner.model_config}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_tp1_and_hf(
    world: int, tp_models: dict[str, Path], reference: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Every architecture at TP=world: logits within 1e-5 of TP=1, greedy tokens identical on
    every rank, logits within the HF tolerance of transformers, rank bytes as the layout says."""
    ranks = run_ranks(_shard_run, world, {k: str(v) for k, v in tp_models.items()}, tmp_path)
    for name, ref in reference.items():
        got = ranks[0][name]
        diff = max(
            (got["prefill"] - ref["prefill"]).abs().max().item(),
            (got["decode"] - ref["decode"]).abs().max().item(),
        )
        print(f"TP={world} {name}: max |logit diff| vs TP=1 = {diff:.2e}")
        assert diff <= TOL, f"{name}: TP={world} logits differ from TP=1 by {diff}"
        for r in range(world):
            assert ranks[r][name]["tokens"] == ref["tokens"], f"{name}: rank {r} tokens differ"
            want = _expected_rank_bytes(ref["mc"], ref["bytes"], world, r)
            assert ranks[r][name]["bytes"] == want, f"{name}: rank {r} bytes"
        share = ranks[0][name]["bytes"] / ref["bytes"]
        print(f"  rank 0 holds {ranks[0][name]['bytes']} of {ref['bytes']} bytes ({share:.3f})")
        assert share < 1 / world + 0.25
        hf = load_hf_model(tp_models[name])
        with torch.no_grad():
            for i, p in enumerate(PROMPTS):
                logits = hf(torch.tensor([p])).logits[0].float()
                start = sum(len(q) for q in PROMPTS[:i])
                mine = got["prefill"][start : start + len(p)]
                torch.testing.assert_close(mine, logits, atol=HF_TOL, rtol=0)


def test_tp_refuses_unsplittable_shapes(tp_models: dict[str, Path]) -> None:
    """A size that does not divide the heads, or KV heads that neither divide nor are divided by
    it, is a ValueError naming the dimension."""
    mc = ModelConfig.from_dir(tp_models["llama"])  # 4 heads, 2 KV heads, intermediate 128
    check_tp(mc, 4)
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_tp(mc, 3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TPShard(0, 4).kv_heads(3)
    with pytest.raises(ValueError, match="expert_parallel_size"):
        ModelRunner(
            tp_models["mixtral"],
            EngineConfig(dtype="float32", num_kv_blocks=8, expert_parallel_size=2),
            TPShard(0, 2),
        )

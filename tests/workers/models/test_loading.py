"""Config parsing and checkpoint loading: sharded files, dtypes, and the errors users see."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from testkit.hf_tiny import load_hf_model
from testkit.paged_batch import PagedSeqs

from batonserve.kernels.rope import RopeScaling
from batonserve.workers.config import EngineConfig
from batonserve.workers.model_runner import ModelRunner, cpu_has_native_bf16
from batonserve.workers.models.config import ModelConfig

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
}


def _prefill_logits(runner: ModelRunner, tokens: list[int]) -> torch.Tensor:
    seqs = PagedSeqs(block_size=runner.block_size, num_blocks=runner.num_blocks)
    return runner.execute(seqs.step({seqs.add(): tokens}, all_logits=True))


def test_config_legacy_keys_and_defaults() -> None:
    raw = {
        **BASE,
        "num_key_value_heads": 2,
        "head_dim": 32,  # explicit head_dim wins over hidden / heads
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
        },
        "torch_dtype": "bfloat16",
        "eos_token_id": [5, 6],
        "bos_token_id": 4,
    }
    cfg = ModelConfig.from_dict(raw, {"eos_token_id": 7})
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.torch_dtype) == (2, 32, "bfloat16")
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert cfg.eos_token_ids == (7,) and cfg.bos_token_id == 4  # generation_config first
    assert ModelConfig.from_dict(raw).eos_token_ids == (5, 6)
    assert not cfg.is_moe and cfg.sliding_window is None
    plain = ModelConfig.from_dict(BASE)
    assert (plain.num_kv_heads, plain.head_dim, plain.torch_dtype) == (8, 8, "float32")
    assert plain.rope_scaling is None and plain.rope_theta == 10000.0


def test_config_sliding_window_rules_and_moe() -> None:
    mistral = ModelConfig.from_dict(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 16}
    )
    assert mistral.layer_window(0) == 16 and mistral.layer_window(1) == 16
    qwen_off = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16}
    assert ModelConfig.from_dict(qwen_off).sliding_window is None  # use_sliding_window false
    qwen = ModelConfig.from_dict({**qwen_off, "use_sliding_window": True, "max_window_layers": 1})
    assert qwen.attention_bias and qwen.layer_window(0) is None and qwen.layer_window(1) == 16
    moe = ModelConfig.from_dict(
        {
            **BASE,
            "architectures": ["MixtralForCausalLM"],
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        }
    )
    assert moe.is_moe and moe.num_experts_per_tok == 2


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        ModelConfig.from_dict({**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict({**BASE, "hidden_size": None})
    with pytest.raises(ValueError, match=r"rope_type.*yarn"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_dict({**BASE, "num_key_value_heads": 3})


def test_unsupported_architecture_dir_raises(
    hf_tiny_dir: Callable[..., Path], tmp_path: Path
) -> None:
    path = shutil.copytree(hf_tiny_dir("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"unsupported model architecture 'FalconForCausalLM'.*Mixtral"
    ):
        ModelRunner(path, EngineConfig(num_kv_blocks=4))


def test_missing_tensor_and_shape_mismatch_name_the_tensor(
    hf_tiny_dir: Callable[..., Path], tmp_path: Path
) -> None:
    path = shutil.copytree(hf_tiny_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        ModelRunner(path, EngineConfig(num_kv_blocks=4))
    shutil.copy(hf_tiny_dir("llama") / "model.safetensors", path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        ModelRunner(path, EngineConfig(num_kv_blocks=4))


def test_unknown_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model"):
        ModelRunner(tmp_path / "nope", EngineConfig())


def test_sharded_checkpoint_loads_same_weights(hf_tiny_dir: Callable[..., Path]) -> None:
    single = hf_tiny_dir("qwen2")
    sharded = hf_tiny_dir("qwen2", shard=True)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    tokens = [5, 9, 100, 7, 42]
    a = _prefill_logits(ModelRunner(single, EngineConfig(num_kv_blocks=8)), tokens)
    b = _prefill_logits(ModelRunner(sharded, EngineConfig(num_kv_blocks=8)), tokens)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_and_run(
    arch: str, dtype: str, hf_tiny_dir: Callable[..., Path]
) -> None:
    """A half-precision checkpoint served in that dtype tracks HF's float32 logits."""
    path = hf_tiny_dir(arch, dtype=dtype)
    runner = ModelRunner(path, EngineConfig(dtype=dtype, num_kv_blocks=16, block_size=8))
    assert runner.dtype == getattr(torch, dtype) and runner.kv_cache.dtype == runner.dtype
    tokens = [3, 50, 200, 17, 99, 123, 8, 64, 31]
    seqs = PagedSeqs(block_size=8, num_blocks=16)
    s = seqs.add()
    logits = runner.execute(seqs.step({s: tokens}, all_logits=True))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    hf = load_hf_model(path, torch.float32)
    ref = hf(torch.tensor([tokens])).logits[0].detach()
    if arch == "mixtral":
        # A near-tied router choice may pick another expert for one token after a half-precision
        # rounding (seen in bf16: top-2 logits 0.0439 vs 0.0437): that row may leave the band.
        ok = [torch.allclose(a, b, atol=0.1, rtol=0.05) for a, b in zip(logits, ref, strict=True)]
        assert sum(not x for x in ok) <= 1, ok
    else:
        torch.testing.assert_close(logits, ref, atol=0.1, rtol=0.05)
    step = runner.execute(seqs.step({s: [77]}))  # one paged decode step in half precision
    ref_step = hf(torch.tensor([[*tokens, 77]])).logits[0, -1].detach()
    torch.testing.assert_close(step[0], ref_step, atol=0.1, rtol=0.05)


def test_dtype_override_on_float32_checkpoint(hf_tiny_dir: Callable[..., Path]) -> None:
    path = hf_tiny_dir("llama")
    runner = ModelRunner(path, EngineConfig(dtype="bfloat16", num_kv_blocks=8))
    assert runner.dtype == torch.bfloat16
    auto = torch.bfloat16 if cpu_has_native_bf16() else torch.float32  # "auto" on CPU
    assert ModelRunner(path, EngineConfig(num_kv_blocks=8)).dtype == auto
    logits = _prefill_logits(runner, [3, 4, 5, 6])
    assert torch.isfinite(logits).all()

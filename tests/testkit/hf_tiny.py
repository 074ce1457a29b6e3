"""Test helper: tiny random-weight Hugging Face models (built with `transformers`) saved to a directory.

`make_tiny_model("llama", tmp_path / "m")` writes config.json, model.safetensors (or shards with
model.safetensors.index.json), tokenizer.json and generation_config.json, and returns the path.
Every architecture uses GQA (2 KV heads for 4 query heads) so the grouped path is always exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "llama3_rope", "mistral", "qwen2", "llama_tied", "mixtral", "qwen2_moe")

BOS_ID = 0
EOS_ID = 1
PAD_ID = 2
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
TOKENIZER_VOCAB = 384  # byte alphabet (256) + specials + learned merges

# A fixed corpus so the learned BPE merges (and thus token ids) are identical on every run.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def main():\n    print('hello world')\n    return 0\n",
    "import torch\nfrom pathlib import Path\nclass Model:\n    pass\n",
    "Once upon a time there was a little model that served tokens all day long.",
    "for i in range(10):\n    total += i * i\nprint(total)\n",
    "Paged attention splits the key value cache into blocks of fixed size.",
]


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> Any:
    """A small deterministic byte-level BPE tokenizer (tokenizers.Tokenizer) with <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("</s>") == EOS_ID
    return tok


def _config(arch: str, vocab: int, overrides: dict[str, Any]) -> Any:
    """The transformers config object for `arch` with tiny defaults, then `overrides`."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        # Larger than HF's 0.02 so random logits are spread out (fewer near-ties in greedy parity).
        initializer_range=0.08,
    )
    if arch in ("llama", "llama_tied", "llama3_rope"):
        cls: Any = tf.LlamaConfig
        common.update(rope_theta=10000.0)
        if arch == "llama_tied":
            common.update(tie_word_embeddings=True)
        if arch == "llama3_rope":
            common.update(
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
            )
    elif arch == "mistral":
        cls = tf.MistralConfig
        common.update(rope_theta=10000.0, sliding_window=None, head_dim=16)
    elif arch == "qwen2":
        cls = tf.Qwen2Config
        common.update(rope_theta=10000.0, use_sliding_window=False, sliding_window=None)
    elif arch == "mixtral":
        cls = tf.MixtralConfig
        common.update(
            rope_theta=10000.0,
            intermediate_size=96,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
        )
    elif arch == "qwen2_moe":
        cls = tf.Qwen2MoeConfig
        common.update(
            rope_theta=10000.0,
            use_sliding_window=False,
            sliding_window=None,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    else:
        raise ValueError(f"arch: unknown tiny arch {arch!r}; choose one of {list(ARCHS)}")
    common.update(overrides)
    return cls(**common)


def make_tiny_model(
    arch: str,
    path: Path,
    *,
    dtype: str = "float32",
    seed: int = 0,
    shard: bool = False,
    **config_overrides: Any,
) -> Path:
    """Build a tiny random-weight HF model of `arch` and save it (weights, tokenizer, generation config) at `path`."""
    import transformers as tf

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = int(config_overrides.pop("vocab_size", tok.get_vocab_size()))
    config = _config(arch, vocab, config_overrides)
    torch.manual_seed(seed * 100 + ARCHS.index(arch))  # distinct weights per arch
    model_cls: Any = {
        "llama": tf.LlamaForCausalLM,
        "llama_tied": tf.LlamaForCausalLM,
        "llama3_rope": tf.LlamaForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "mixtral": tf.MixtralForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
    }[arch]
    model = model_cls(config).eval()
    if arch in ("qwen2", "qwen2_moe"):
        # HF zero-inits biases; give them values so the q/k/v bias path is actually checked.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.1)
    with torch.no_grad():
        # HF inits RMSNorm weights to 1; perturb them so a missing norm weight would show.
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, max_shard_size="100KB" if shard else "10GB")
    tok.save(str(path / "tokenizer.json"))
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return path


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """Load the saved model back with transformers (eager attention) for parity checks."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()

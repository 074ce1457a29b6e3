"""Test helper: a random Mixtral checkpoint written tensor by tensor (never all in memory).

transformers would build the whole model in memory first; this writes the safetensors file
directly (8-byte header length, JSON header, raw little-endian data), one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": 384,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Mixtral checkpoint with its shape."""
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (v, d),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, d),
            p + "block_sparse_moe.gate.weight": (cfg["num_local_experts"], d),
        }
        for e in range(cfg["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            out |= {q + "w1.weight": (i, d), q + "w3.weight": (i, d), q + "w2.weight": (d, i)}
    return out


def expert_bytes(cfg: dict) -> int:
    """Bytes of all experts (float16)."""
    per = 3 * cfg["hidden_size"] * cfg["intermediate_size"] * 2
    return per * cfg["num_local_experts"] * cfg["num_hidden_layers"]


def write_big_mixtral(path: Path, cfg: dict | None = None, seed: int = 0) -> Path:
    """Write config.json and model.safetensors (float16, random) under `path`."""
    cfg = dict(CONFIG if cfg is None else cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = dict(sorted(tensor_shapes(cfg).items()))
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with (path / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g) * 0.05
            f.write(t.half().numpy().tobytes())
    return path

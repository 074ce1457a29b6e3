"""Save the demo models in canonical Hugging Face layout; routing statistics; greedy samples.

Needs `transformers` (the `test` extra) only for the functions that take a transformers model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

SAVE_DTYPE = torch.float16
# PretrainedConfig defaults that say nothing about a causal LM checkpoint
_NOISE_KEYS = (
    "_name_or_path",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "problem_type",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_encoder_decoder",
)


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer expert load (share of top-k assignments) and mean per-token routing entropy."""

    num_experts: int
    top_k: int
    num_tokens: int
    load: tuple[tuple[float, ...], ...]  # [num_layers][num_experts], each row sums to 1
    entropy: tuple[float, ...]  # [num_layers], nats, of the softmax over all experts

    @property
    def uniform_entropy(self) -> float:
        """Entropy of uniform routing, ln(num_experts)."""
        return math.log(self.num_experts)


def routing_stats(router_logits: list[torch.Tensor], top_k: int) -> RoutingStats:
    """Expert load and entropy from each layer's router logits `[num_tokens, num_experts]`."""
    loads: list[tuple[float, ...]] = []
    ents: list[float] = []
    num_experts = router_logits[0].shape[-1]
    for logits in router_logits:
        probs = torch.softmax(logits.double(), dim=-1)  # [T, E]
        top = torch.topk(probs, top_k, dim=-1).indices  # [T, k]
        counts = torch.bincount(top.flatten(), minlength=num_experts).double()
        loads.append(tuple((counts / counts.sum()).tolist()))
        ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [T]
        ents.append(float(ent.mean()))
    return RoutingStats(num_experts, top_k, router_logits[0].shape[0], tuple(loads), tuple(ents))


@torch.no_grad()
def hf_router_logits(model: Any, ids: torch.Tensor) -> list[torch.Tensor]:
    """Router logits `[num_tokens, num_experts]` per layer of a transformers Mixtral model."""
    captured: list[torch.Tensor] = []

    def hook(_mod: torch.nn.Module, _inp: Any, out: Any) -> None:
        captured.append(out[0].detach().float().reshape(-1, out[0].shape[-1]))

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    try:
        model(input_ids=ids.reshape(1, -1))
    finally:
        for h in handles:
            h.remove()
    return captured


def canonical_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under the canonical Llama / Mixtral checkpoint names, in SAVE_DTYPE.

    transformers 5.x keeps Mixtral experts fused (`mlp.experts.gate_up_proj` [E, 2I, H],
    `mlp.experts.down_proj` [E, H, I]); real checkpoints store `block_sparse_moe.experts.{e}.w1/w2/w3`.
    """
    out: dict[str, torch.Tensor] = {}
    tied = bool(model.config.tie_word_embeddings)
    for name, t in model.state_dict().items():
        t = t.detach().to(SAVE_DTYPE)
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".mlp.experts.gate_up_proj") + ".block_sparse_moe.experts"
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = t[e, :inter].clone()  # gate  [I, H]
                out[f"{prefix}.{e}.w3.weight"] = t[e, inter:].clone()  # up    [I, H]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".mlp.experts.down_proj") + ".block_sparse_moe.experts"
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = t[e].clone()  # down  [H, I]
        elif ".mlp.gate.weight" in name and model.config.model_type == "mixtral":
            out[name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")] = t.clone()
        else:
            out[name] = t.clone().contiguous()
    return out


def save_model_dir(model: Any, out_dir: Path, eos_id: int) -> dict[str, torch.Tensor]:
    """Write config.json, model.safetensors and generation_config.json; return the saved tensors."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = canonical_state_dict(model)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "float16"
    cfg["torch_dtype"] = "float16"  # the key older readers look for
    cfg["use_cache"] = True
    # transformers 5 nests rope_theta in rope_parameters; keep the flat key older readers use too
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    for noise in _NOISE_KEYS:
        cfg.pop(noise, None)
    cfg.pop("output_router_logits", None)
    if cfg.get("model_type") == "mixtral":
        cfg["output_router_logits"] = False
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": eos_id, "eos_token_id": eos_id, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return tensors


@torch.no_grad()
def verify_reload(model: Any, out_dir: Path, ids: torch.Tensor) -> float:
    """Reload `out_dir` with transformers and return max |logit diff| vs the fp16-rounded model."""
    from transformers import AutoModelForCausalLM

    ref = type(model)(model.config)
    ref.load_state_dict({k: v.to(SAVE_DTYPE).float() for k, v in model.state_dict().items()})
    ref.eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    a = ref(input_ids=ids.reshape(1, -1)).logits
    b = loaded(input_ids=ids.reshape(1, -1)).logits
    return float((a - b).abs().max())


@torch.no_grad()
def greedy_sample(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation (new token ids only), with the KV cache of transformers."""
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return [int(t) for t in out[0, len(prompt_ids) :]]

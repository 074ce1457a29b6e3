"""ModelConfig: the frozen, validated view of a Hugging Face config.json (+ generation_config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batonserve.kernels.rope_scaling import SUPPORTED_ROPE_TYPES, RopeScaling
from batonserve.workers.models.registry import ARCHITECTURES

_QWEN2 = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")  # q/k/v bias, use_sliding_window rules
# The floating-point types weights and the KV cache may use (torch's names): the one list.
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs from config.json, typed."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    layer_sliding: tuple[bool, ...]  # per layer: does the sliding window apply
    torch_dtype: str
    num_local_experts: int
    num_experts_per_tok: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    # MoE details beyond Mixtral's (defaults are Mixtral's): each routed expert's width, the
    # always-on shared expert (Qwen2-MoE; 0 = none), whether the top-k weights are renormalised,
    # and the layers that keep a dense MLP instead of experts.
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dense_mlp_layers: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        """True for a mixture-of-experts model (Mixtral-style sparse MLP)."""
        return self.num_local_experts > 0

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full attention."""
        return self.sliding_window if self.layer_sliding[layer] else None

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Parse `model_dir/config.json` and, when present, `generation_config.json`."""
        raw = _read_json(model_dir / "config.json")
        gen_path = model_dir / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.is_file() else {}
        return cls.from_dict(raw, gen)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], gen: dict[str, Any] | None = None) -> ModelConfig:
        """Build from parsed config.json (and generation_config.json) contents."""
        gen = gen or {}
        archs = raw.get("architectures") or []
        arch = str(archs[0]) if archs else str(raw.get("model_type", "<missing>"))
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"architectures: unsupported model architecture {arch!r}; "
                f"supported: {list(ARCHITECTURES)}"
            )
        hidden = _req_int(raw, "hidden_size")
        heads = _req_int(raw, "num_attention_heads")
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ValueError(
                f"num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}"
            )
        layers = _req_int(raw, "num_hidden_layers")
        theta, scaling = _rope(raw)
        window = _sliding_window(raw, arch)
        return cls(
            architecture=arch,
            vocab_size=_req_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req_int(raw, "intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(raw, arch),
            sliding_window=window,
            layer_sliding=_layer_sliding(raw, arch, layers, window),
            torch_dtype=_dtype(raw),
            num_local_experts=int(raw.get("num_local_experts", raw.get("num_experts", 0)) or 0),
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 0) or 0),
            eos_token_ids=_ids(gen.get("eos_token_id")) or _ids(raw.get("eos_token_id")),
            bos_token_id=_opt_int(gen.get("bos_token_id", raw.get("bos_token_id"))),
            **_moe_details(raw, arch, layers),
        )


def _attention_bias(raw: dict[str, Any], arch: str) -> bool:
    """q/k/v biases: always in Qwen2, `qkv_bias` (default on) in Qwen2-MoE, else `attention_bias`."""
    if arch == "Qwen2ForCausalLM":
        return True
    if arch == "Qwen2MoeForCausalLM":
        return bool(raw.get("qkv_bias", True))
    return bool(raw.get("attention_bias", False))


def _moe_details(raw: dict[str, Any], arch: str, layers: int) -> dict[str, Any]:
    """Qwen2-MoE's fields (expert width, shared expert, norm_topk_prob, dense layers)."""
    if arch != "Qwen2MoeForCausalLM":
        return {}
    step = int(raw.get("decoder_sparse_step", 1) or 1)
    only = {int(i) for i in raw.get("mlp_only_layers") or []}
    return {
        "moe_intermediate_size": _req_int(raw, "moe_intermediate_size"),
        "shared_expert_intermediate_size": int(raw.get("shared_expert_intermediate_size", 0) or 0),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "dense_mlp_layers": tuple(i for i in range(layers) if i in only or (i + 1) % step != 0),
    }


def _read_json(path: Path) -> dict[str, Any]:
    """Load a JSON object, naming the file on error."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _req_int(raw: dict[str, Any], key: str) -> int:
    """A required positive integer field."""
    value = raw.get(key)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
    return value


def _opt_int(value: Any) -> int | None:
    """An optional id (the first one if a list)."""
    ids = _ids(value)
    return ids[0] if ids else None


def _ids(value: Any) -> tuple[int, ...]:
    """Token id(s) as a tuple: int, list of ints, or None."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from legacy `rope_theta`/`rope_scaling` or transformers-5 `rope_parameters`."""
    params = raw.get("rope_parameters")
    scaling_raw = params if isinstance(params, dict) else raw.get("rope_scaling")
    theta = float((params or {}).get("rope_theta", raw.get("rope_theta", 10000.0)))
    if not scaling_raw:
        return theta, None
    rope_type = str(scaling_raw.get("rope_type", scaling_raw.get("type", "default")))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type: unsupported {rope_type!r}; "
            f"supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(scaling_raw.get("factor", 1.0)),
        low_freq_factor=float(scaling_raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling_raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            scaling_raw.get("original_max_position_embeddings", 8192)
        ),
    )


def _sliding_window(raw: dict[str, Any], arch: str) -> int | None:
    """The sliding window, if the model uses one (Qwen2 only with use_sliding_window)."""
    window = raw.get("sliding_window")
    if arch in _QWEN2 and not raw.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _layer_sliding(
    raw: dict[str, Any], arch: str, layers: int, window: int | None
) -> tuple[bool, ...]:
    """Which layers use the window: `layer_types` when given, else Qwen2's max_window_layers rule."""
    if window is None:
        return (False,) * layers
    types = raw.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return tuple(t == "sliding_attention" for t in types)
    if arch in _QWEN2:
        first = int(raw.get("max_window_layers", 0))
        return tuple(i >= first for i in range(layers))
    return (True,) * layers


def _dtype(raw: dict[str, Any]) -> str:
    """The checkpoint dtype (`torch_dtype` or transformers-5 `dtype`), float32 when absent."""
    value = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
    return value if value in DTYPES else "float32"

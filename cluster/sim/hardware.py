"""Machines and models as the simulator sees them: cost, power, memory, links, KV bytes per token.

Figures are configurable; the defaults are Splitwise's DGX machines (8 GPUs each) and the two
models of its profile table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MachineSpec:
    """One machine type (a whole server: the unit a pool replica runs on)."""

    name: str  # matches the `hardware` column of the performance table
    cost_per_hour: float  # dollars
    power_w: float  # provisioned power (TDP, or the cap for a power-capped machine)
    num_gpus: int = 8
    gpu_memory_gb: float = 80.0
    link_gb_per_s: float = 200.0  # KV-transfer bandwidth out of/into this machine, GB/s
    kv_memory_fraction: float = 0.9  # of memory left after weights that holds KV
    kv_capacity_tokens: int = 0  # if > 0, overrides the memory-based KV capacity

    def __post_init__(self) -> None:
        if self.cost_per_hour < 0 or self.power_w < 0:
            raise ValueError(f"machine {self.name}: cost_per_hour and power_w must be >= 0")
        if self.link_gb_per_s <= 0:
            raise ValueError(f"machine {self.name}: link_gb_per_s must be > 0")


@dataclass(frozen=True)
class ModelSpec:
    """The model facts that size the KV cache and the handoff."""

    name: str  # matches the `model` column of the performance table
    num_layers: int
    num_kv_heads: int  # GQA: fewer than the attention heads
    head_dim: int
    weight_bytes: float
    kv_bytes_per_element: int = 2  # fp16/bf16
    tensor_parallel: int = 8  # which rows of the performance table to use

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 x layers x KV heads x head size x bytes per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes_per_element


def kv_capacity_tokens(machine: MachineSpec, model: ModelSpec) -> int:
    """KV token slots one machine holds for `model`, after its weights."""
    if machine.kv_capacity_tokens > 0:
        return machine.kv_capacity_tokens
    total = machine.num_gpus * machine.gpu_memory_gb * 1e9
    free = (total - model.weight_bytes) * machine.kv_memory_fraction
    if free <= 0:
        raise ValueError(f"model {model.name} does not fit on machine {machine.name}")
    return int(free // model.kv_bytes_per_token)


def transfer_seconds(
    num_tokens: int, model: ModelSpec, src: MachineSpec, dst: MachineSpec
) -> float:
    """Time to move `num_tokens` tokens of KV over the slower of the two machines' links."""
    bw = min(src.link_gb_per_s, dst.link_gb_per_s) * 1e9
    return num_tokens * model.kv_bytes_per_token / bw


# Splitwise's Table: DGX-A100 $17.6/h, 6.5 kW; DGX-H100 $38/h, 10.2 kW; 8 x 200 Gb/s and 8 x 400
# Gb/s InfiniBand. The power-capped H100 runs at 70% of its power for the token phase.
DEFAULT_MACHINES: dict[str, MachineSpec] = {
    m.name: m
    for m in (
        MachineSpec("a100-80gb", cost_per_hour=17.6, power_w=6500.0, link_gb_per_s=200.0),
        MachineSpec("h100-80gb", cost_per_hour=38.0, power_w=10200.0, link_gb_per_s=400.0),
        MachineSpec("h100-80gb-pcap", cost_per_hour=38.0, power_w=7140.0, link_gb_per_s=400.0),
    )
}

DEFAULT_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        # Llama-2-70B: 80 layers, 64 query heads sharing 8 KV heads of 128 (GQA).
        ModelSpec("llama2-70b", num_layers=80, num_kv_heads=8, head_dim=128, weight_bytes=140e9),
        # BLOOM-176B: 70 layers, 112 heads of 128, no GQA (every head has its own K and V).
        ModelSpec("bloom-176b", num_layers=70, num_kv_heads=112, head_dim=128, weight_bytes=352e9),
    )
}


def model_spec_from_hf(
    model_dir: str | Path, name: str = "", tensor_parallel: int = 1
) -> ModelSpec:
    """A ModelSpec from a Hugging Face directory's config.json (weights sized from the files)."""
    d = Path(model_dir)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model: cannot read {d / 'config.json'}: {e}") from None
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // heads
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    weights = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    return ModelSpec(
        name=name or d.name,
        num_layers=int(cfg["num_hidden_layers"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        weight_bytes=float(weights),
        kv_bytes_per_element=4 if dtype == "float32" else 2,
        tensor_parallel=tensor_parallel,
    )

"""Streaming load of a MoE model whose experts do not all fit: experts never enter the model.

`load_without_experts` builds the model on the meta device (no memory), gives every parameter
except the stacked expert weights real storage on the target device, and reads only those tensors
from the checkpoint. The experts are then read one at a time, straight from the safetensors files,
into the store's tiers (`ExpertStore.warm`): the fast tier up to its budget, the RAM tier up to its
budget, the rest stays on disk. Peak memory is the non-expert weights plus the tier budgets plus
one expert in flight, never the whole model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from batonserve.kernels.rope import rope_inv_freq
from batonserve.workers.expert_store.types import ExpertKey
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.models.layers import SparseMoE
from batonserve.workers.models.loader import load_weights
from batonserve.workers.tp.shard import TPShard

RAM_SHARE_OF_AVAILABLE = 0.5  # the RAM tier never takes more than this share of free host memory


def _expert_params(model: nn.Module) -> set[int]:
    """ids of the stacked expert tensors of every sparse MoE block."""
    return {
        id(p) for m in model.modules() if isinstance(m, SparseMoE) for p in (m.w_gate_up, m.w_down)
    }


def _materialize(model: nn.Module, device: torch.device, skip: set[int]) -> None:
    """Real (uninitialised) storage on `device` for every meta parameter not in `skip`.

    Shared parameters (tied embeddings) stay shared: one new tensor per old one.
    """
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or id(p) in skip or not p.is_meta:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False
                )
            module._parameters[name] = new[id(p)]


def load_without_experts(
    model_cls: type[nn.Module],
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    model_dir: Path,
    tp: TPShard | None = None,
) -> nn.Module:
    """The model with every non-expert weight loaded on `device`; expert tensors stay on meta.

    With `tp`, the model is that rank's shard (its non-expert slices; the store reads its experts').
    """
    model = model_cls(cfg, dtype, torch.device("meta"), tp or TPShard())
    skip = _expert_params(model)
    if not skip:
        raise ValueError("model: no sparse MoE layers; nothing to stream into the expert store")
    _materialize(model, device, skip)
    # The one computed buffer of the model family (rope frequencies), rebuilt off meta.
    model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"model: buffer {left[0]!r} cannot be rebuilt for a streaming load")
    specs = [s for s in model.weight_specs() if not s[1].is_meta]  # type: ignore[operator]
    load_weights(model_dir, specs)
    return model


def warm_order(
    num_layers: int, num_experts: int, popularity: Sequence[Sequence[int]] | None
) -> list[ExpertKey]:
    """Which experts to load first: most routed first when popularity is known, else one expert
    of every layer before the next (so no layer starts with all its experts on disk)."""
    keys = [ExpertKey(layer, e) for e in range(num_experts) for layer in range(num_layers)]
    if popularity is None:
        return keys
    return sorted(keys, key=lambda k: -int(popularity[k.layer][k.expert]))


def available_host_bytes() -> int:
    """MemAvailable of this host (Linux), or 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def ram_budget_bytes(fraction: float, expert_bytes_total: int, device: torch.device) -> int:
    """The RAM tier's budget: `fraction` of all expert bytes on a GPU, capped by free host memory;
    0 on CPU (the compute tier already is host memory)."""
    if device.type != "cuda" or fraction <= 0:
        return 0
    want = int(fraction * expert_bytes_total)
    free = available_host_bytes()
    return min(want, int(RAM_SHARE_OF_AVAILABLE * free)) if free else want

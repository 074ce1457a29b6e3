"""Qwen2-MoE: the Qwen2 decoder (q/k/v biases) with fine-grained experts plus a shared expert.

Each MoE layer routes every token to its top-k of E narrow SwiGLU experts (softmax over all E;
the k weights are renormalised only with `norm_topk_prob`) and adds an always-on shared expert
scaled by its own sigmoid gate. Layers listed as dense (`mlp_only_layers`, `decoder_sparse_step`)
keep a plain SwiGLU MLP.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from batonserve.kernels.moe import (
    grouped_swiglu,
    permute_by_expert,
    topk_routing,
    unpermute_combine,
)
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.models.layers import NO_TP, SparseMoE, SwiGLU, WeightSpecs, new_param
from batonserve.workers.models.llama import DecoderLayer, LlamaForCausalLM
from batonserve.workers.tp.shard import TPShard


class SharedExpert(nn.Module):
    """sigmoid(gate x) * swiglu(x): the expert every token uses (Qwen2-MoE)."""

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPShard = NO_TP
    ) -> None:
        super().__init__()
        width = cfg.shared_expert_intermediate_size
        self.mlp = SwiGLU(replace(cfg, intermediate_size=width), dtype, device, tp)
        self.gate = new_param(1, cfg.hidden_size, dtype=dtype, device=device)  # [1, D]

    def weight_specs(self, prefix: str) -> WeightSpecs:
        """HF names under the MoE block's prefix ('model.layers.N.mlp.')."""
        return [
            *self.mlp.weight_specs(prefix + "shared_expert."),
            (prefix + "shared_expert_gate.weight", self.gate),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D] (a partial sum under TP: the gate is a per-row scale)."""
        return torch.sigmoid(F.linear(x, self.gate)) * self.mlp(x)


class Qwen2MoE(SparseMoE):
    """Top-k routed experts (Qwen2 names, optional renormalisation) plus the shared expert.

    Stacked expert weights have SparseMoE's layout, so the expert store and expert parallelism
    handle it as they handle Mixtral; `renormalize` and `shared` tell them what differs.
    """

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPShard = NO_TP
    ) -> None:
        moe_cfg = replace(cfg, intermediate_size=cfg.moe_intermediate_size)
        super().__init__(moe_cfg, dtype, device, tp)
        self.renormalize = cfg.norm_topk_prob
        self.shared = (
            SharedExpert(cfg, dtype, device, tp) if cfg.shared_expert_intermediate_size else None
        )

    def weight_specs(self, prefix: str) -> WeightSpecs:
        """HF names under `prefix` ('model.layers.N.mlp.')."""
        specs: WeightSpecs = [
            (prefix + "gate.weight", self.gate),
            *self.expert_specs(prefix, "gate_proj", "up_proj", "down_proj"),
        ]
        if self.shared is not None:
            specs += self.shared.weight_specs(prefix)
        return specs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (this rank's partial sum under TP)."""
        weights, ids = topk_routing(
            F.linear(x, self.gate), self.top_k, renormalize=self.renormalize
        )
        permuted, perm = permute_by_expert(x, ids, self.num_experts)
        out = grouped_swiglu(permuted, perm.counts, self.w_gate_up, self.w_down)
        out = unpermute_combine(out, perm, weights)
        return out if self.shared is None else out + self.shared(x)


class Qwen2MoeDecoderLayer(DecoderLayer):
    """Qwen2 decoder layer whose MLP is Qwen2MoE (or a dense SwiGLU on the dense layers)."""

    def make_mlp(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """Experts on MoE layers, a dense SwiGLU of `intermediate_size` on the others."""
        if self.attn.layer in cfg.dense_mlp_layers:
            return SwiGLU(cfg, dtype, device, self.tp)
        return Qwen2MoE(cfg, dtype, device, self.tp)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    """Qwen2-MoE causal LM (Qwen1.5-MoE, Qwen2-57B-A14B)."""

    layer_cls = Qwen2MoeDecoderLayer

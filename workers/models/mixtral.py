"""Mixtral: the Llama decoder with a sparse top-k MoE feed-forward block."""

from __future__ import annotations

import torch
from torch import nn

from batonserve.workers.models.config import ModelConfig
from batonserve.workers.models.layers import SparseMoE
from batonserve.workers.models.llama import DecoderLayer, LlamaForCausalLM


class MixtralDecoderLayer(DecoderLayer):
    """Decoder layer whose MLP is a softmax top-k router over SwiGLU experts."""

    mlp_prefix = "block_sparse_moe."

    def make_mlp(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """Mixtral's sparse MoE block."""
        return SparseMoE(cfg, dtype, device, self.tp)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral-style MoE causal LM."""

    layer_cls = MixtralDecoderLayer

"""Llama family (Llama 2/3, Mistral, Qwen2): one pre-norm decoder with flags from ModelConfig.

Flags: q/k/v bias (Qwen2), tied embeddings, sliding window (Mistral, Qwen2), rope scaling (Llama 3).
Tensor parallel (`tp`): the blocks return partial sums, all-reduced here once per block; the
embedding and LM head are vocab-parallel (padded row slices; logits all-gathered).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batonserve.kernels.linear import PackedWeight, linear, pack_weight
from batonserve.kernels.rope import rope_cos_sin, rope_inv_freq
from batonserve.workers.forward_context import get_forward_context
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.models.layers import (
    NO_TP,
    Attention,
    RMSNorm,
    SwiGLU,
    WeightSpecs,
    attention_decode,
    new_param,
    sharded,
)
from batonserve.workers.tp.shard import TPShard


class DecoderLayer(nn.Module):
    """x -> x + attn(norm(x)) -> x + mlp(norm(x)), with the residual carried separately."""

    mlp_prefix = "mlp."

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: TPShard = NO_TP,
    ) -> None:
        super().__init__()
        self.tp = tp  # read by make_mlp
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.attn = Attention(cfg, layer, dtype, device, tp)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = self.make_mlp(cfg, dtype, device)

    def make_mlp(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """The feed-forward block (dense SwiGLU here; MoE in Mixtral)."""
        return SwiGLU(cfg, dtype, device, self.tp)

    def weight_specs(self, prefix: str) -> WeightSpecs:
        """HF names under `prefix` ('model.layers.N.')."""
        mlp_specs: WeightSpecs = self.mlp.weight_specs(prefix + self.mlp_prefix)  # type: ignore[operator]
        return [
            (prefix + "input_layernorm.weight", self.input_norm.weight),
            (prefix + "post_attention_layernorm.weight", self.post_norm.weight),
            *self.attn.weight_specs(prefix + "self_attn."),
            *mlp_specs,
        ]

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [T, D], residual or None) -> (mlp output, residual stream), both [T, D]."""
        if residual is None:
            residual, h = x, self.input_norm(x)
        else:
            h, residual = self.input_norm.add_forward(x, residual)
        h = self.tp.all_reduce(self.attn(h))
        h, residual = self.post_norm.add_forward(h, residual)
        return self.tp.all_reduce(self.mlp(h)), residual

    def forward_decode(
        self, x: torch.Tensor, residual: torch.Tensor | None, *attn_args: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """forward for a decode-only batch, inputs explicit (layers.attention_decode)."""
        if residual is None:
            residual, h = x, self.input_norm(x)
        else:
            h, residual = self.input_norm.add_forward(x, residual)
        h = self.tp.all_reduce(attention_decode(self.attn, h, *attn_args))
        h, residual = self.post_norm.add_forward(h, residual)
        return self.tp.all_reduce(self.mlp(h)), residual


class LlamaForCausalLM(nn.Module):
    """Causal LM of the Llama family over a paged KV cache."""

    layer_cls: type[DecoderLayer] = DecoderLayer

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPShard = NO_TP
    ) -> None:
        super().__init__()
        self.cfg, self.tp = cfg, tp
        # Vocab rows [v0, v1) of the checkpoint; `rows` >= v1 - v0 (the last rank's zero padding).
        self.v0, self.v1, rows = tp.vocab(cfg.vocab_size)
        self.embed = new_param(rows, cfg.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            [self.layer_cls(cfg, i, dtype, device, tp) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.lm_head = (
            self.embed
            if cfg.tie_word_embeddings
            else new_param(rows, cfg.hidden_size, dtype=dtype, device=device)
        )
        self.lm_head_packed: PackedWeight | None = None  # set by prepack()
        inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        self.register_buffer("inv_freq", inv, persistent=False)  # [head_dim / 2] float32

    def weight_specs(self) -> WeightSpecs:
        """Every checkpoint tensor this model needs, by HF name, with its destination."""
        v0, v1, tp = self.v0, self.v1, self.tp
        specs: WeightSpecs = [
            sharded("model.embed_tokens.weight", self.embed, tp, 0, v0, v1),
            ("model.norm.weight", self.norm.weight),
        ]
        if not self.cfg.tie_word_embeddings:
            specs.append(sharded("lm_head.weight", self.lm_head, tp, 0, v0, v1))
        for i, layer in enumerate(self.layers):
            specs += layer.weight_specs(f"model.layers.{i}.")  # type: ignore[operator]
        return specs

    def prepack(self, layout: str = "onednn") -> None:
        """Pack loaded dense weights for the CPU GEMM (kernels/linear.py): call after loading.
        layout: the packing of bf16 weights (kernels/linear.py, EngineConfig.cpu_gemm)."""
        for module in self.modules():
            pack = getattr(module, "prepack", None) if module is not self else None
            if pack is not None:
                pack(layout)
        self.lm_head_packed = pack_weight(self.lm_head, layout)

    def supports_decode_graph(self) -> bool:
        """True when forward_decode covers this model (dense SwiGLU MLPs; MoE and TP stay eager)."""
        return self.tp.size == 1 and all(type(layer.mlp) is SwiGLU for layer in self.layers)  # type: ignore[union-attr]

    def forward_decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        context_lens: torch.Tensor,
        kv_cache: torch.Tensor,
        block_size: int,
    ) -> torch.Tensor:
        """A decode-only step with every input explicit, for capture (workers/decode_graph.py):
        input_ids/positions/slots [B]; tables [B, W] int32; context_lens [B] int32;
        kv_cache [layers, 2, blocks, bs, Hkv, d]. Returns logits [B, vocab] float32."""
        cos, sin = (t.to(self.embed.dtype) for t in rope_cos_sin(positions, self.inv_freq))
        h = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            h, residual = layer.forward_decode(  # type: ignore[operator]
                h,
                residual,
                cos,
                sin,
                kv_cache[i, 0],
                kv_cache[i, 1],
                slots,
                tables,
                context_lens,
                block_size,
            )
        assert residual is not None
        return self.logits(self.norm(h + residual))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, D]; under TP each rank looks up its rows, zeros the rest, sums."""
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed)
        local = input_ids - self.v0
        other = (local < 0) | (local >= self.v1 - self.v0)  # ids another rank owns
        h = F.embedding(local.masked_fill(other, 0), self.embed)
        return self.tp.all_reduce(h.masked_fill(other[:, None], 0))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden rows [R, D] -> float32 logits [R, vocab] (rank slices gathered, unpadded)."""
        out = linear(h, self.lm_head, None, self.lm_head_packed, fp32_out=True)  # [R, rows]
        return self.tp.all_gather_last(out)[:, : self.cfg.vocab_size].float()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        """input_ids/positions [T] -> logits [len(logits_indices), vocab] float32."""
        ctx = get_forward_context()
        # Shared by all layers, cast once to the model dtype (apply_rope's cast, done per step).
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        ctx.rope_cos, ctx.rope_sin = cos.to(self.embed.dtype), sin.to(self.embed.dtype)
        h = self.embed_tokens(input_ids)  # [T, D]
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual)
        assert residual is not None
        # Norm is per row: keep only the rows whose logits are wanted before norm and lm_head.
        h = (h + residual)[logits_indices]
        return self.logits(self.norm(h))

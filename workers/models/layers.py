"""Model building blocks: RMSNorm, attention over the paged KV cache, SwiGLU MLP, MoE block.

Projections are fused (q/k/v into one matrix, gate/up into one) to keep the op count per layer
small; `weight_specs` maps each Hugging Face tensor name onto its slice of a fused parameter.
Under tensor parallelism (`tp`, workers/tp/) every block holds only its rank's shard and returns
a partial sum; the decoder layer all-reduces it. A spec then names the checkpoint region to read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batonserve.kernels.activation import silu_and_mul
from batonserve.kernels.linear import PackedWeight, linear, pack_weight
from batonserve.kernels.moe import moe_swiglu
from batonserve.kernels.norm import fused_add_rms_norm, rms_norm
from batonserve.kernels.rope import apply_rope
from batonserve.workers.forward_context import get_forward_context
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.tp.shard import Region, TPShard

# (HF tensor name, destination view of a parameter) or, for a tensor-parallel shard, with the
# region of the checkpoint tensor to read: (name, destination, (dim, start, stop)).
WeightSpec = tuple[str, torch.Tensor] | tuple[str, torch.Tensor, Region]
WeightSpecs = list[WeightSpec]
NO_TP = TPShard()


def sharded(
    name: str, dest: torch.Tensor, tp: TPShard, dim: int, start: int, stop: int
) -> WeightSpec:
    """The spec of `dest`: the whole tensor without TP, else rows/columns [start, stop) of `dim`."""
    return (name, dest) if tp.size == 1 else (name, dest, (dim, start, stop))


def new_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """An uninitialised, frozen parameter (the loader fills it)."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = new_param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        return rms_norm(x, self.weight, self.eps)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)."""
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """GQA self-attention: fused qkv, RoPE, write K/V to the paged cache, attend, project out."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        tp: TPShard = NO_TP,
    ) -> None:
        super().__init__()
        self.layer, self.tp = layer, tp
        # This rank's heads: [h0, h1) of the query heads, [kv0, kv1) of the KV heads.
        self.h0, h1 = tp.split(cfg.num_heads, "num_attention_heads")
        self.kv0, kv1 = tp.kv_heads(cfg.num_kv_heads)
        self.num_heads, self.num_kv, self.head_dim = h1 - self.h0, kv1 - self.kv0, cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv * self.head_dim
        self.window = cfg.layer_window(layer)
        qkv = self.q_size + 2 * self.kv_size
        self.qkv_weight = new_param(qkv, cfg.hidden_size, dtype=dtype, device=device)
        self.qkv_bias = new_param(qkv, dtype=dtype, device=device) if cfg.attention_bias else None
        self.o_weight = new_param(cfg.hidden_size, self.q_size, dtype=dtype, device=device)
        self.qkv_packed: PackedWeight | None = None  # set by prepack() once weights are loaded
        self.o_packed: PackedWeight | None = None

    def prepack(self, layout: str = "onednn") -> None:
        """Pack the loaded projection weights for the CPU GEMM (kernels/linear.py)."""
        self.qkv_packed = pack_weight(self.qkv_weight, layout)
        self.o_packed = pack_weight(self.o_weight, layout)

    def weight_specs(self, prefix: str) -> WeightSpecs:
        """HF names q/k/v/o_proj under `prefix` (e.g. 'model.layers.0.self_attn.')."""
        q, kv, d, tp = self.q_size, self.kv_size, self.head_dim, self.tp
        qs, ks = self.h0 * d, self.kv0 * d  # this rank's first row in q_proj / k_proj, v_proj
        specs: WeightSpecs = [sharded(prefix + "o_proj.weight", self.o_weight, tp, 1, qs, qs + q)]
        for kind, full in (("weight", self.qkv_weight), ("bias", self.qkv_bias)):
            if full is not None:
                specs += [
                    sharded(f"{prefix}q_proj.{kind}", full[:q], tp, 0, qs, qs + q),
                    sharded(f"{prefix}k_proj.{kind}", full[q : q + kv], tp, 0, ks, ks + kv),
                    sharded(f"{prefix}v_proj.{kind}", full[q + kv :], tp, 0, ks, ks + kv),
                ]
        return specs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (this rank's partial sum under TP); writes this layer's
        new K/V (this rank's KV heads) at the batch's slot_mapping."""
        ctx = get_forward_context()
        t = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv, self.head_dim
        qkv = linear(x, self.qkv_weight, self.qkv_bias, self.qkv_packed)  # [T, (H + 2 Hkv) d]
        assert ctx.rope_cos is not None and ctx.rope_sin is not None
        # RoPE on q and k together: they are adjacent columns of qkv.
        qk = apply_rope(
            qkv[:, : self.q_size + self.kv_size].view(t, h + kvh, d), ctx.rope_cos, ctx.rope_sin
        )
        q, k = qk[:, :h], qk[:, h:]  # [T, H, d], [T, Hkv, d]
        v = qkv[:, self.q_size + self.kv_size :].view(t, kvh, d)
        k_cache, v_cache = ctx.kv_caches[self.layer]  # [blocks, bs, Hkv, d]
        slots = ctx.batch.slot_mapping
        k_cache.view(-1, kvh, d).index_copy_(0, slots, k)
        v_cache.view(-1, kvh, d).index_copy_(0, slots, v)
        if ctx.layer_hook is not None:
            ctx.layer_hook(self.layer)
        if ctx.sp is not None:  # this rank's rows only; the group supplies the other keys
            out = ctx.sp.attend(q, k, v, self.window)  # [T, H, d]
        else:
            out = ctx.attn.attend(q, k_cache, v_cache, self.window)  # [T, H, d]
        return linear(out.reshape(t, self.q_size), self.o_weight, None, self.o_packed)


def attention_decode(
    attn: Attention,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """Attention.forward for a decode-only batch with every input explicit (no forward context):
    the form a compiled graph captures. K/V write and attention are one custom op."""
    from batonserve.kernels import decode_op  # noqa: F401  (registers the op)

    t = x.shape[0]
    h, kvh, d = attn.num_heads, attn.num_kv, attn.head_dim
    qkv = linear(x, attn.qkv_weight, attn.qkv_bias, attn.qkv_packed)
    qk = apply_rope(qkv[:, : attn.q_size + attn.kv_size].view(t, h + kvh, d), cos, sin)
    v = qkv[:, attn.q_size + attn.kv_size :].view(t, kvh, d)
    out = torch.ops.batonserve.decode_attention_kv(
        qk[:, :h],
        qk[:, h:],
        v,
        k_cache,
        v_cache,
        slots,
        tables,
        context_lens,
        attn.window or 0,
        block_size,
    )
    return linear(out.reshape(t, attn.q_size), attn.o_weight, None, attn.o_packed)


class SwiGLU(nn.Module):
    """Dense MLP: down(silu(gate x) * up x), gate and up fused in one matrix."""

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPShard = NO_TP
    ) -> None:
        super().__init__()
        self.tp = tp
        self.i0, i1 = tp.split(cfg.intermediate_size, "intermediate_size")
        self.inter = i1 - self.i0  # this rank's slice of the intermediate width
        self.gate_up = new_param(2 * self.inter, cfg.hidden_size, dtype=dtype, device=device)
        self.down = new_param(cfg.hidden_size, self.inter, dtype=dtype, device=device)
        self.gate_up_packed: PackedWeight | None = None  # set by prepack()
        self.down_packed: PackedWeight | None = None

    def prepack(self, layout: str = "onednn") -> None:
        """Pack the loaded weights for the CPU GEMM (kernels/linear.py)."""
        self.gate_up_packed = pack_weight(self.gate_up, layout)
        self.down_packed = pack_weight(self.down, layout)

    def weight_specs(self, prefix: str) -> WeightSpecs:
        """HF names gate/up/down_proj under `prefix` (e.g. 'model.layers.0.mlp.')."""
        i, i0, tp = self.inter, self.i0, self.tp
        return [
            sharded(prefix + "gate_proj.weight", self.gate_up[:i], tp, 0, i0, i0 + i),
            sharded(prefix + "up_proj.weight", self.gate_up[i:], tp, 0, i0, i0 + i),
            sharded(prefix + "down_proj.weight", self.down, tp, 1, i0, i0 + i),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (this rank's partial sum under TP)."""
        gu = linear(x, self.gate_up, None, self.gate_up_packed)  # [T, 2I]
        return linear(silu_and_mul(gu), self.down, None, self.down_packed)


class SparseMoE(nn.Module):
    """Mixtral sparse MLP: softmax top-k router over E SwiGLU experts (stacked weights).

    Under TP every expert is split by its intermediate width (router replicated), so each rank
    runs all experts on its slice and returns a partial sum, exactly as a dense SwiGLU does.
    """

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tp: TPShard = NO_TP
    ) -> None:
        super().__init__()
        self.tp = tp
        self.i0, i1 = tp.split(cfg.intermediate_size, "the experts' intermediate size")
        e, i, hid = cfg.num_local_experts, i1 - self.i0, cfg.hidden_size
        self.inter, self.top_k, self.num_experts = i, cfg.num_experts_per_tok, e
        self.gate = new_param(e, hid, dtype=dtype, device=device)  # router
        self.w_gate_up = new_param(e, 2 * i, hid, dtype=dtype, device=device)
        self.w_down = new_param(e, hid, i, dtype=dtype, device=device)

    def weight_specs(self, prefix: str) -> WeightSpecs:
        """HF names under `prefix` (e.g. 'model.layers.0.block_sparse_moe.')."""
        return [(prefix + "gate.weight", self.gate), *self.expert_specs(prefix, "w1", "w3", "w2")]

    def expert_specs(self, prefix: str, gate: str, up: str, down: str) -> WeightSpecs:
        """Every expert's gate/up/down tensors (HF names `gate`, `up`, `down`) under `prefix`."""
        i, i0, tp = self.inter, self.i0, self.tp
        specs: WeightSpecs = []
        for e in range(self.num_experts):
            p = f"{prefix}experts.{e}."
            specs += [
                sharded(f"{p}{gate}.weight", self.w_gate_up[e, :i], tp, 0, i0, i0 + i),
                sharded(f"{p}{up}.weight", self.w_gate_up[e, i:], tp, 0, i0, i0 + i),
                sharded(f"{p}{down}.weight", self.w_down[e], tp, 1, i0, i0 + i),
            ]
        return specs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        logits = F.linear(x, self.gate)  # [T, E]
        return moe_swiglu(x, logits, self.w_gate_up, self.w_down, self.top_k)

"""The sparse MoE block (Mixtral, Qwen2-MoE) with experts from a provider (resident or the store).

`attach_store(model, ...)` swaps every `SparseMoE` of a loaded model for a `RoutedMoE` whose experts
come from an ExpertStore, and frees the stacked expert weights, so only resident experts stay in
memory. Routing, permutation and combine are the model's own kernels and each expert runs the same
ops on the same rows, so logits are bitwise those of the all-resident model. A `MoEController`
shared by the layers drives the predictor (forecasts before each layer runs) and records traces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from batonserve.kernels.moe import permute_by_expert, topk_routing, unpermute_combine
from batonserve.kernels.moe_experts import swiglu_experts
from batonserve.workers.expert_store.predictor import RoutingPredictor
from batonserve.workers.expert_store.store import ExpertStore
from batonserve.workers.expert_store.types import ExpertKey, ExpertWeights
from batonserve.workers.models.layers import SparseMoE


class ExpertProvider(Protocol):
    """Where a RoutedMoE gets the weights of the experts a batch uses."""

    def experts(
        self, layer: int, ids: Sequence[int], tokens_per_expert: Sequence[int]
    ) -> list[ExpertWeights]:
        """Weights of experts `ids` (ascending) of `layer`."""
        ...


class ResidentExperts:
    """Every expert in memory: views into each layer's stacked weights (the baseline)."""

    def __init__(self, stacked: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.stacked = stacked  # per layer (w_gate_up [E, 2I, D], w_down [E, D, I])

    def experts(
        self, layer: int, ids: Sequence[int], tokens_per_expert: Sequence[int]
    ) -> list[ExpertWeights]:
        """Views of the requested experts."""
        gu, down = self.stacked[layer]
        return [ExpertWeights(gu[e], down[e]) for e in ids]

    @property
    def nbytes(self) -> int:
        """Bytes of all experts."""
        return sum(t.numel() * t.element_size() for pair in self.stacked for t in pair)


@dataclass
class RoutingRecord:
    """One forward's routing (and, when asked, the predictor's input features)."""

    ids: list[torch.Tensor] = field(default_factory=list)  # per layer [T, k] int64
    embed: torch.Tensor | None = None  # [T, D] token embeddings
    moe_in: list[torch.Tensor] = field(default_factory=list)  # per layer [T, D] MoE inputs


class MoEController:
    """Shared by a model's RoutedMoE layers: provider, optional store, predictor, recorder."""

    def __init__(
        self,
        provider: ExpertProvider,
        num_layers: int,
        store: ExpertStore | None = None,
        predictor: RoutingPredictor | None = None,
        top_m: int = 2,
        record: bool = False,
        record_features: bool = False,
    ) -> None:
        self.provider = provider
        self.num_layers = num_layers
        self.store = store
        self.predictor = predictor
        self.top_m = top_m
        self.record = record or record_features
        self.record_features = record_features
        self.records: list[RoutingRecord] = []
        # False under TP: the model's embedding is a vocab shard, so layer 0 gets no forecast
        self.forecast_from_embed = True

    def begin_forward(self, input_ids: torch.Tensor, embed: torch.Tensor) -> None:
        """Forward start: forecast every layer from the token embeddings."""
        if self.record:
            rec = RoutingRecord()
            if self.record_features:
                rec.embed = F.embedding(input_ids, embed).float().cpu()
            self.records.append(rec)
        if self.store is None:
            return
        self.store.begin_forward(int(input_ids.shape[0]))
        if self.predictor is not None and self.forecast_from_embed:
            self._forecast(-1, F.embedding(input_ids, embed))

    def after_routing(self, layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        """Layer `layer` routed x [T, D] to ids [T, k]: record, and forecast the later layers."""
        if self.record:
            rec = self.records[-1]
            rec.ids.append(ids.cpu())
            if self.record_features:
                rec.moe_in.append(x.float().cpu())
        if self.store is not None and self.predictor is not None and layer < self.num_layers - 1:
            self._forecast(layer, x)

    def _forecast(self, source: int, feature: torch.Tensor) -> None:
        """Send the predictor's top-m experts per later layer to the store (policy + prefetch)."""
        assert self.store is not None and self.predictor is not None
        sets = self.predictor.forecast_sets(source, feature, self.top_m)
        self.store.forecast(
            {
                self.store.tick_of(target): [ExpertKey(target, e) for e in sorted(experts)]
                for target, experts in sets.items()
            }
        )


class RoutedMoE(nn.Module):
    """A sparse MoE block (Mixtral, Qwen2-MoE) whose experts come from the controller's provider.

    `renormalize`: the top-k weights sum to 1 (Mixtral; Qwen2-MoE's norm_topk_prob). `shared`: an
    always-on expert module added to the output (Qwen2-MoE), kept resident.
    """

    def __init__(
        self,
        layer: int,
        gate: torch.Tensor,
        top_k: int,
        num_experts: int,
        ctl: MoEController,
        renormalize: bool = True,
        shared: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layer, self.top_k, self.num_experts = layer, top_k, num_experts
        self.gate = nn.Parameter(gate, requires_grad=False)  # [E, D] router
        self.ctl = ctl
        self.renormalize = renormalize
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        logits = F.linear(x, self.gate)  # [T, E]
        weights, ids = topk_routing(logits, self.top_k, renormalize=self.renormalize)  # [T, k]
        permuted, perm = permute_by_expert(x, ids, self.num_experts)  # [T*k, D]
        self.ctl.after_routing(self.layer, x, ids)
        counts = perm.counts.tolist()
        active = [e for e, n in enumerate(counts) if n > 0]
        used = [counts[e] for e in active]
        ws = self.ctl.provider.experts(self.layer, active, used)
        out = swiglu_experts(permuted, used, [(w.w_gate_up, w.w_down) for w in ws])
        out = unpermute_combine(out, perm, weights)
        return out if self.shared is None else out + self.shared(x)


def sparse_moe_layers(model: nn.Module) -> list[tuple[Any, SparseMoE]]:
    """(decoder layer, its SparseMoE) for every MoE layer of a loaded model.

    The store keys experts by decoder layer index, so every layer must be a MoE layer.
    """
    layers = list(model.layers)  # type: ignore[arg-type]
    found = [(layer, layer.mlp) for layer in layers if isinstance(layer.mlp, SparseMoE)]
    if not found:
        raise ValueError("model: no sparse MoE layers to serve from an expert store")
    if len(found) != len(layers):
        raise ValueError(
            f"model: {len(layers) - len(found)} of {len(layers)} layers have a dense MLP "
            "(mlp_only_layers / decoder_sparse_step); the expert store needs every layer sparse"
        )
    return found


def _install(model: nn.Module, ctl: MoEController) -> None:
    """Swap the SparseMoE blocks for RoutedMoE and hook the forward start."""
    for i, (layer, moe) in enumerate(sparse_moe_layers(model)):
        renormalize = bool(getattr(moe, "renormalize", True))
        shared = getattr(moe, "shared", None)
        layer.mlp = RoutedMoE(
            i, moe.gate.data, moe.top_k, moe.num_experts, ctl, renormalize, shared
        )

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        ctl.begin_forward(args[0], module.embed)  # type: ignore[arg-type]

    model.register_forward_pre_hook(pre_hook)


def attach_resident(model: nn.Module, record_features: bool = False) -> MoEController:
    """All experts resident (views of the loaded weights); records routing (and features)."""
    layers = sparse_moe_layers(model)
    provider = ResidentExperts([(moe.w_gate_up.data, moe.w_down.data) for _, moe in layers])
    ctl = MoEController(provider, len(layers), record=True, record_features=record_features)
    _install(model, ctl)
    return ctl


def attach_store(
    model: nn.Module,
    store: ExpertStore,
    predictor: RoutingPredictor | None = None,
    record: bool = False,
) -> MoEController:
    """Serve the experts of `model` from `store`; the stacked expert weights are released.

    With a predictor, its top `store.config.prefetch_top_m` experts per token and later layer
    are forecast to the store's policy (and prefetched when the store prefetches).
    """
    layers = sparse_moe_layers(model)
    top_m = store.config.prefetch_top_m
    ctl = MoEController(store, len(layers), store, predictor, top_m, record=record)
    _install(model, ctl)  # the SparseMoE modules (and their expert tensors) are now unreferenced
    return ctl

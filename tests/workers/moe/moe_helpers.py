"""Helpers shared by the MoE tests: demo-moe runners with the store or expert parallelism."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store import (
    ExpertStore,
    PolicyContext,
    RoutingPredictor,
    StoreConfig,
    attach_resident,
    attach_store,
    default_predictor_path,
)
from batonserve.workers.expert_store.decode import DecodeResult, greedy_decode
from batonserve.workers.expert_store.simulate import demand_sequence, group_ends_of
from batonserve.workers.expert_store.types import ExpertKey
from batonserve.workers.model_runner import ModelRunner

MODEL = "demo-moe"
PROMPTS = ([0, 17, 301, 42, 9, 1000, 77], [0, 5, 6, 7], [0, 2222, 333, 44, 555])


def runner() -> ModelRunner:
    """A fresh demo-moe runner on CPU in its checkpoint dtype (float16; "auto" may pick bf16)."""
    cfg = EngineConfig(dtype="float16", device="cpu", num_kv_blocks=32, block_size=16)
    return ModelRunner(MODEL, cfg)


@dataclass
class ResidentRun:
    """The all-resident reference: result, demand trace and its layer groups."""

    result: DecodeResult
    demands: list[ExpertKey]
    group_ends: list[int]
    ctx: PolicyContext


def resident_run(prompts: tuple[list[int], ...], max_new_tokens: int) -> ResidentRun:
    """Decode on the all-resident model, recording routing."""
    r = runner()
    ctl = attach_resident(r.model)
    res = greedy_decode(r, prompts, max_new_tokens, keep_logits=True)
    ids = [rec.ids for rec in ctl.records]
    demands = demand_sequence(ids)
    pred = RoutingPredictor.load(default_predictor_path(MODEL))
    ctx = PolicyContext(
        r.model_config.num_layers,
        r.model_config.num_local_experts,
        popularity=pred.popularity_counts(),
        future=tuple(demands),
    )
    return ResidentRun(res, demands, group_ends_of(ids), ctx)


def store_run(
    ref: ResidentRun, prompts: tuple[list[int], ...], config: StoreConfig
) -> tuple[DecodeResult, ExpertStore]:
    """Decode with experts served by an ExpertStore (predictor attached when prefetching)."""
    r = runner()
    store = ExpertStore(r.model_dir, config, ref.ctx)
    pred = RoutingPredictor.load(default_predictor_path(MODEL))
    use_pred = config.prefetch or config.policy == "predictive"
    attach_store(r.model, store, pred if use_pred else None)
    try:
        res = greedy_decode(r, prompts, len(ref.result.tokens[0]), keep_logits=True)
        store.drain()
    finally:
        store.close()
    return res, store


def same_logits(a: DecodeResult, b: DecodeResult) -> bool:
    """Bitwise-equal logits at every step."""
    return len(a.logits) == len(b.logits) and all(
        torch.equal(x, y) for x, y in zip(a.logits, b.logits, strict=True)
    )

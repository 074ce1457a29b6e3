"""Part of bench_moe.py: distinct experts per batch with and without token regrouping."""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from moe_bench_cache import MODEL, runner

from batonserve.workers.expert_store import (
    ExpertKey,
    RegroupConfig,
    RoutingPredictor,
    WaitingToken,
    attach_resident,
    default_predictor_path,
    select_batch,
)
from batonserve.workers.expert_store.decode import make_batch
from batonserve.workers.expert_store.regroup import select_fifo


def forecast_path(pred: RoutingPredictor, embed: torch.Tensor, token: int) -> frozenset[ExpertKey]:
    """The predictor's top-2 experts in every layer for `token`, from its embedding alone."""
    feat = F.embedding(torch.tensor([token]), embed)
    top = pred.top_m(-1, feat, 2)
    return frozenset(ExpertKey(t, int(e)) for t, ids in top.items() for e in ids[0].tolist())


def run_regroup(
    prompts: list[list[int]], steps: int, batch_size: int, max_wait: int, regroup: bool
) -> dict[str, float]:
    """Decode len(prompts) requests, batch_size tokens per forward; measure the batches' experts."""
    r = runner()
    ctl = attach_resident(r.model)
    pred = RoutingPredictor.load(default_predictor_path(MODEL))
    n = len(prompts)
    blocks = -(-(max(map(len, prompts)) + steps + 1) // r.block_size)
    seqs = [list(p) for p in prompts]
    logits = r.execute(make_batch(r, seqs, [0] * n, blocks))  # prefill all (not measured)
    cfg = RegroupConfig(batch_size, max_wait)
    waiting: dict[int, WaitingToken] = {}
    for i, tok in enumerate(logits.argmax(-1).tolist()):
        seqs[i].append(int(tok))
        waiting[i] = WaitingToken(str(i), 0, forecast_path(pred, r.model.embed, int(tok)))
    select = select_batch if regroup else select_fifo
    distinct: list[float] = []
    waits: list[int] = []
    for step in range(steps):
        batch = select(list(waiting.values()), step, cfg)
        chosen = [int(t.request_id) for t in batch]
        waits += [step - t.ready_step for t in batch]
        starts = [len(seqs[i]) - 1 for i in chosen]
        out = r.execute(make_batch(r, [seqs[i] for i in chosen], starts, blocks, chosen))
        routing = ctl.records[-1].ids  # per layer [B, k]
        distinct.append(statistics.mean(int(torch.unique(ids).numel()) for ids in routing))
        for i, tok in zip(chosen, out.argmax(-1).tolist(), strict=True):
            seqs[i].append(int(tok))
            waiting[i] = WaitingToken(
                str(i), step + 1, forecast_path(pred, r.model.embed, int(tok))
            )
    waits.sort()
    return {
        "distinct_per_layer": statistics.mean(distinct),
        "wait_p50": float(waits[len(waits) // 2]),
        "wait_p99": float(waits[min(len(waits) - 1, int(0.99 * len(waits)))]),
        "wait_max": float(waits[-1]),
    }

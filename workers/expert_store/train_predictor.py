"""Record routing traces of a MoE model over the corpus and train the RoutingPredictor.

    python3 -m batonserve.workers.expert_store.train_predictor --model demo-moe

Traces are teacher-forced prefills of training-split chunks (each token's routing and features are
what a decode of that token would see). Writes predictors/<model>.safetensors (probes + popularity)
and prints held-out recall of the forecasts.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.decode import make_batch
from batonserve.workers.expert_store.moe_block import RoutingRecord, attach_resident
from batonserve.workers.expert_store.predictor import (
    RoutingPredictor,
    default_predictor_path,
    normalise,
)
from batonserve.workers.expert_store.workload import corpus_chunks
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.models.paths import resolve_model_dir


def record(model: str, split: str, num_chunks: int, length: int) -> list[RoutingRecord]:
    """Prefill each chunk through the all-resident model and return its routing records."""
    runner = ModelRunner(model, EngineConfig(device="cpu", dtype="auto"))
    ctl = attach_resident(runner.model, record_features=True)
    blocks = -(-length // runner.block_size)
    for chunk in corpus_chunks(runner.model_dir, split, num_chunks, length):
        runner.execute(make_batch(runner, [chunk], [0], blocks))
    return ctl.records


def features(records: list[RoutingRecord], source: int) -> torch.Tensor:
    """Stacked features of a source over all records: [N, D]."""
    rows = [r.embed if source < 0 else r.moe_in[source] for r in records]
    return torch.cat([x for x in rows if x is not None])


def targets(records: list[RoutingRecord], layer: int, num_experts: int) -> torch.Tensor:
    """Multi-hot routing of `layer`: [N, E] float32."""
    ids = torch.cat([r.ids[layer] for r in records])  # [N, k]
    hot = torch.zeros(ids.shape[0], num_experts)
    hot.scatter_(1, ids, 1.0)
    return hot


def train(
    records: list[RoutingRecord],
    num_layers: int,
    num_experts: int,
    steps: int,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> RoutingPredictor:
    """Fit one logistic probe per (source, target) with Adam on BCE."""
    torch.manual_seed(seed)
    probes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    pairs = RoutingPredictor.pairs(num_layers)
    for n, (s, t) in enumerate(pairs):
        x = normalise(features(records, s))  # [N, D]
        y = targets(records, t, num_experts)  # [N, E]
        w = torch.zeros(num_experts, x.shape[1], requires_grad=True)
        b = torch.zeros(num_experts, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.02, weight_decay=1e-4)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w.T + b, y)
            loss.backward()
            opt.step()
        probes[(s, t)] = (w.detach().clone(), b.detach().clone())
        if progress is not None and (n + 1) % max(1, len(pairs) // 10) == 0:
            progress(f"trained {n + 1}/{len(pairs)} probes")
    pop = torch.stack([targets(records, t, num_experts).sum(0) for t in range(num_layers)])
    return RoutingPredictor(num_layers, num_experts, probes, pop.to(torch.int64))


def recall(
    pred: RoutingPredictor, records: list[RoutingRecord], m: int
) -> dict[tuple[int, int], float]:
    """Share of actual (token, expert) routings found in the top-m forecast, per (source, target)."""
    out: dict[tuple[int, int], float] = {}
    for s, t in RoutingPredictor.pairs(pred.num_layers):
        top = pred.top_m(s, features(records, s), m)[t]  # [N, m]
        y = targets(records, t, pred.num_experts)  # [N, E]
        out[(s, t)] = float(y.gather(1, top).sum() / y.sum())
    return out


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo-moe")
    ap.add_argument("--chunks", type=int, default=96)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    train_recs = record(args.model, "train", args.chunks, args.length)
    held = record(args.model, "heldout", max(8, args.chunks // 6), args.length)
    print(f"recorded {len(train_recs)} + {len(held)} chunks in {time.time() - t0:.1f}s")
    mc = ModelConfig.from_dir(resolve_model_dir(args.model))
    L, E = mc.num_layers, mc.num_local_experts
    pred = train(train_recs, L, E, args.steps)
    for m in (2, 3, 4):
        r = recall(pred, held, m)
        print(f"held-out recall@{m}: " + ", ".join(f"{s}->{t}: {v:.3f}" for (s, t), v in r.items()))
    out = args.out or default_predictor_path(Path(args.model).name)
    pred.save(out)
    print(f"wrote {out} ({out.stat().st_size} bytes) in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

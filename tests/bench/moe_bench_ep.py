"""Part of bench_moe.py: MoE layer time over 2 gloo ranks per overlap degree, and the tuner's pick."""

from __future__ import annotations

import json
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batonserve.workers.parallel.ep_tuner import EPSettings, EPTuner, bucket_of
from batonserve.workers.parallel.expert_parallel import ExpertParallelMoE

LAYER = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _timed(block: ExpertParallelMoE, x: torch.Tensor, s: EPSettings | None) -> float:
    """One forward's time, the max over ranks (what the slowest rank waits)."""
    dist.barrier()
    t0 = time.perf_counter()
    block(x, s)
    dt = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def _worker(rank: int, port: int, data: str, out: str, cfg: dict) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    w = torch.load(data)
    gate, wgu, wd = (w[k].float() for k in ("gate", "w_gate_up", "w_down"))
    feats = w["x"].float()  # [N, D] real MoE inputs of the layer
    res: dict[str, dict[str, float]] = {}
    picks: dict[str, object] = {}
    overlaps = cfg["overlaps"]
    for tokens in cfg["tokens"]:
        x = feats[rank * tokens : (rank + 1) * tokens]
        block = ExpertParallelMoE(gate, wgu, wd, top_k=2)
        times: dict[int, list[float]] = {o: [] for o in overlaps}
        for _ in range(cfg["warmup"]):
            for o in overlaps:
                _timed(block, x, EPSettings(o))
        for _ in range(cfg["reps"]):  # interleaved so drift hits every degree alike
            for o in overlaps:
                times[o].append(_timed(block, x, EPSettings(o)))
        res[str(tokens)] = {str(o): statistics.median(t) for o, t in times.items()}
        tuner = EPTuner(
            [EPSettings(o) for o in overlaps], samples_per_candidate=7, probe_every=8, window=11
        )
        tuned = ExpertParallelMoE(gate, wgu, wd, top_k=2, tuner=tuner)
        for _ in range(cfg["tuner_forwards"]):
            _timed(tuned, x, None)
        bucket = tuner.stats.buckets[bucket_of(2 * tokens)]
        picks[str(tokens)] = {
            "overlap": bucket.current.overlap,
            "switches": bucket.switches,
            "decisions": len(tuner.stats.decisions),
            "medians_ms": {str(c.overlap): 1e3 * m for c, m in bucket.medians_s.items()},
        }
    dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"median_s": res, "tuner": picks}))


def run_ep(
    runner_dir: Path, tmp: Path, tokens: list[int], overlaps: list[int]
) -> dict[str, object]:
    """Record the layer's weights and real inputs, then time it on 2 gloo ranks."""
    from moe_bench_cache import runner

    from batonserve.workers.expert_store import attach_resident
    from batonserve.workers.expert_store.decode import make_batch
    from batonserve.workers.expert_store.workload import corpus_chunks

    r = runner()
    moe = r.model.layers[LAYER].mlp
    weights = {
        "gate": moe.gate.data.clone(),
        "w_gate_up": moe.w_gate_up.data.clone(),
        "w_down": moe.w_down.data.clone(),
    }
    ctl = attach_resident(r.model, record_features=True)
    need = 2 * max(tokens)
    feats: list[torch.Tensor] = []
    for chunk in corpus_chunks(r.model_dir, "heldout", 64, 256):
        r.execute(make_batch(r, [chunk], [0], 16))
        feats.append(ctl.records[-1].moe_in[LAYER])
        if sum(f.shape[0] for f in feats) >= need:
            break
    weights["x"] = torch.cat(feats)[:need]
    data = tmp / "ep_layer.pt"
    torch.save(weights, data)
    out = tmp / "ep_result.json"
    cfg = {"tokens": tokens, "overlaps": overlaps, "warmup": 3, "reps": 25, "tuner_forwards": 140}
    mp.spawn(_worker, args=(_free_port(), str(data), str(out), cfg), nprocs=2, join=True)
    return json.loads(out.read_text())

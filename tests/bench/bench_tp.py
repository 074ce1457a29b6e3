"""Tensor-parallel benchmark: prefill and decode step time at TP=1 and TP=2, the all-reduce's
share of the step, bytes per all-reduce against the formula, and the NVLink prediction.

    python3 tests/bench/bench_tp.py [--hidden 1024] [--layers 4] [--prompt 256] [--batch 8]

One machine, CPU, gloo on 127.0.0.1; every rank one torch thread (TP=1 is one process with one
thread, TP=2 two). A random-weight Llama (hidden, 16 heads, 4 KV heads, intermediate 2.75 x
hidden), float32. Each rank wraps TPShard.all_reduce to time it and count its bytes.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: testkit
from testkit.hf_tiny import make_tiny_model
from testkit.paged_batch import PagedSeqs

from batonserve.workers.config import EngineConfig
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.tp import TPShard

NVLINK_GBS = 450.0  # H100 NVLink 4: 900 GB/s both directions, 450 GB/s each way per GPU
NVLINK_LATENCY_S = 8e-6  # one small NCCL all-reduce on one node (order of magnitude)
REPS = 5


def _rank(rank: int, world: int, port: int, model: str, args: Any, out: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    stats = {"n": 0, "s": 0.0, "bytes": 0}
    plain = TPShard.all_reduce

    def timed(self: TPShard, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        plain(self, x)
        stats["s"] += time.perf_counter() - t
        stats["n"] += self.size > 1
        stats["bytes"] += x.numel() * x.element_size() if self.size > 1 else 0
        return x

    TPShard.all_reduce = timed  # type: ignore[method-assign]
    blocks = args.batch * (-(-(args.prompt + 2) // 16)) + 16
    runner = ModelRunner(
        model, EngineConfig(dtype="float32", num_kv_blocks=blocks, block_size=16),
        TPShard(rank, world),
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 380, (args.prompt,), generator=g).tolist()

    def measure(batch: Any) -> dict[str, float]:
        runner.execute(batch)  # warm-up
        times, ar = [], []
        for _ in range(REPS):
            stats.update(n=0, s=0.0, bytes=0)
            dist.barrier()
            t = time.perf_counter()
            runner.execute(batch)
            times.append(time.perf_counter() - t)
            ar.append(stats["s"])
        return {
            "step_s": statistics.median(times),
            "allreduce_s": statistics.median(ar),
            "allreduces": stats["n"],
            "bytes_each": stats["bytes"] / max(1, stats["n"]),
        }

    seqs = PagedSeqs(block_size=16, num_blocks=blocks)
    one = seqs.add()
    prefill = measure(seqs.step({one: prompt}))
    ids = [seqs.add() for _ in range(args.batch)]
    runner.execute(seqs.step({i: prompt for i in ids}))  # fill the batch's context
    decode = measure(seqs.step({i: [7] for i in ids}))
    if rank == 0:
        torch.save({"prefill": prefill, "decode": decode, "bytes": runner.parameter_bytes()},
                   Path(out) / f"tp{world}.pt")  # fmt: skip
    dist.destroy_process_group()


def _run(world: int, model: str, args: Any, out: str) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, model, args, out)) for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    res: dict[str, Any] = torch.load(Path(out) / f"tp{world}.pt", weights_only=False)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    h = args.hidden
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(
            "llama", Path(tmp) / "m", hidden_size=h, intermediate_size=h * 11 // 4,
            num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
            initializer_range=0.02,
        ))  # fmt: skip
        res = {w: _run(w, model, args, tmp) for w in (1, 2)}
    print(f"model: llama hidden {h}, {args.layers} layers, 16 heads / 4 KV, float32; "
          f"rank 0 parameter bytes TP=1 {res[1]['bytes'] / 2**20:.1f} MiB, "
          f"TP=2 {res[2]['bytes'] / 2**20:.1f} MiB")  # fmt: skip
    print("| step | tokens | TP=1 ms | TP=2 ms | TP=2 all-reduce ms (share) | all-reduces | "
          "bytes each (formula) | NVLink all-reduce ms (predicted) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for step, tokens in (("prefill", args.prompt), ("decode", args.batch)):
        one, two = res[1][step], res[2][step]
        formula = tokens * h * 4  # [tokens, hidden] float32, two per layer
        assert two["allreduces"] == 2 * args.layers + 1  # + the vocab-parallel embedding
        # A ring all-reduce moves 2 (N - 1) / N of the buffer through each GPU's link.
        nvlink = two["allreduces"] * (NVLINK_LATENCY_S + 2 * 0.5 * formula / (NVLINK_GBS * 1e9))
        print(
            f"| {step} | {tokens} | {one['step_s'] * 1e3:.2f} | {two['step_s'] * 1e3:.2f} | "
            f"{two['allreduce_s'] * 1e3:.2f} ({two['allreduce_s'] / two['step_s']:.0%}) | "
            f"{two['allreduces']} | {two['bytes_each']:.0f} ({formula}) | {nvlink * 1e3:.3f} |"
        )


if __name__ == "__main__":
    main()

"""Sequence-parallel prefill attention: ring (pass-KV), TokenRing (pass-Q), all-gather, N = 1..4.

    python3 tests/bench/bench_ring.py [--worlds 1,2,3,4] [--length 3072] [--repeats 3] [--threads 1]

Each N runs as N processes joined by gloo on 127.0.0.1 (one process group reused for every shape
and schedule). Per shape: the slowest rank's attention time as a fraction of the single-rank time
(rank 0 attending the whole request alone, measured in the same rounds, side by side), per-step
compute and communication time and the hidden fraction; then the cost model, calibrated in each
run (flop rate from that single-rank time, link bandwidth from a gloo ping), against the measured
fastest; then the longest prompt under a fixed per-rank KV budget, computed from the layout and
run for real at small scale. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from batonserve.kernels.ring import block_attention, plan_block
from batonserve.workers.parallel import (
    AttentionDims,
    HardwareModel,
    SPGroup,
    SPMetrics,
    SPShape,
    choose_schedule,
    plan_sp_attention,
    shard_batch,
    sp_attention,
)
from batonserve.workers.parallel.layout import longest_prompt, max_local_tokens
from batonserve.workers.parallel.schedules import SCHEDULES  # ring, tokenring, allgather

BUDGET_ROWS = 256  # per-rank KV rows for the longest-prompt demonstration


@dataclass(frozen=True)
class Shape:
    """One benchmarked request shape (float32)."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    new: int
    cached: int


def shapes(length: int) -> list[Shape]:
    """MHA and GQA prompts of `length`, and an 8-token chunk over a long cached prefix (KV-heavy)."""
    return [
        Shape("mha", 8, 8, 64, length, 0),
        Shape("gqa-4:1", 8, 2, 64, length, 0),
        Shape("mha-prefix", 8, 8, 64, 8, 8 * length),
    ]


def _run_shape(g: SPGroup, s: Shape, repeats: int) -> dict[str, dict[str, Any]]:
    """Every schedule on one shape, interleaved call by call (drift hits all alike); median call."""
    sh = shard_batch([s.new], [s.cached], g.world_size, g.rank)
    gen = torch.Generator().manual_seed(g.rank)
    q = torch.randn(sh.spec.num_q, s.heads, s.head_dim, generator=gen)
    k = torch.randn(sh.spec.num_kv, s.kv_heads, s.head_dim, generator=gen)
    v = torch.randn_like(k)
    dims = AttentionDims(s.heads, s.kv_heads, s.head_dim, 4)
    plans = {name: plan_sp_attention(sh.spec, g, dims, schedule=name) for name in SCHEDULES}
    runs: dict[str, list[SPMetrics]] = {name: [] for name in SCHEDULES}
    # The single-rank baseline, measured in the same rounds: rank 0 attends the whole request
    # alone while the others wait in a barrier (the machine's load drifts from run to run).
    full = shard_batch([s.new], [s.cached], 1, 0).spec
    fq = torch.randn(full.num_q, s.heads, s.head_dim, generator=gen)
    fk = torch.randn(full.num_kv, s.kv_heads, s.head_dim, generator=gen)
    fplan = plan_block(full.q_pos, full.q_seq, full.kv_pos, full.kv_seq)
    alone: list[float] = []
    for i in range(repeats + 1):
        dist.barrier(group=g.group)
        if g.rank == 0:
            t0 = time.perf_counter()
            block_attention(fq, fk, fk, fplan)
            if i > 0:
                alone.append(time.perf_counter() - t0)
        for name, plan in plans.items():
            dist.barrier(group=g.group)
            m = sp_attention(q, k, v, plan, g).metrics
            if i > 0:  # the first round is the warm-up
                runs[name].append(m)
    out: dict[str, dict[str, Any]] = {
        f"{s.name}/alone": {"total_s": statistics.median(alone) if alone else 0.0}
    }
    for name, ms in runs.items():
        ms.sort(key=lambda m: m.total_s)
        m = ms[len(ms) // 2]
        out[f"{s.name}/{name}"] = {
            "total_s": m.total_s,
            "compute_s": m.compute_s,
            "comm_s": m.comm_s,
            "exposed_s": m.exposed_comm_s,
            "hidden": m.hidden_fraction,
            "steps": len(m.steps),
            "bytes": m.bytes_sent,
        }
    return out


def _ping(g: SPGroup) -> tuple[float, float]:
    """(bytes/s, seconds one way for a tiny message) rank 0 -> 1 over gloo; best of several."""
    big, small = torch.zeros(4 * 1024 * 1024), torch.zeros(1)  # 16 MiB
    best = []
    for buf, reps in ((small, 20), (big, 5)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            if g.rank == 0:
                dist.send(buf, g.global_rank(1), group=g.group)
                dist.recv(small, g.global_rank(1), group=g.group)
            elif g.rank == 1:
                dist.recv(buf, g.global_rank(0), group=g.group)
                dist.send(small, g.global_rank(0), group=g.group)
            times.append(time.perf_counter() - t0)
        best.append(min(times))  # the best round trip: the link, not the noisy neighbours
    lat = best[0] / 2
    return big.numel() * 4 / max(1e-9, best[1] - 2 * lat), lat


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    """One rank: every shape x schedule, the ping and the budget demonstration."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    g = SPGroup(timeout_s=300)
    res: dict[str, Any] = {"runs": {}}
    for s in shapes(args.length):
        res["runs"].update(_run_shape(g, s, args.repeats))
    if world > 1:
        dist.barrier()
        res["ping"] = _ping(g)
    # Longest prompt under BUDGET_ROWS KV rows per rank: run it and record the rows held.
    length = longest_prompt(BUDGET_ROWS, world)
    sh = shard_batch([length], None, world, rank)
    q = torch.randn(sh.spec.num_q, 2, 16)
    k = torch.randn(sh.spec.num_kv, 1, 16)
    plan = plan_sp_attention(sh.spec, g, AttentionDims(2, 1, 16, 4), schedule="ring")
    out = sp_attention(q, k, k.clone(), plan, g).out
    res["budget"] = {
        "length": length,
        "max_rows": max(plan.meta.n_kv),
        "finite": bool(torch.isfinite(out).all()),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _spawn(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run all ranks of one group size; return their records."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_main, args=(world, port, args, tmp), nprocs=world, start_method="spawn"
        )
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    """Run the benchmark and print markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worlds", default="1,2,3,4")
    ap.add_argument("--length", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    worlds = [int(x) for x in args.worlds.split(",")]
    print(f"# cores={os.cpu_count()} threads/rank={args.threads} torch={torch.__version__}")
    recs = {n: _spawn(n, args) for n in worlds}

    def slowest(n: int, key: str, field: str = "total_s") -> float:
        """The slowest rank's figure for one shape/schedule at group size n."""
        return max(r["runs"][key][field] for r in recs[n])

    def alone(n: int, shape: str) -> float:
        """Rank 0's single-rank time for `shape`, measured inside the N = n run."""
        return float(recs[n][0]["runs"][f"{shape}/alone"]["total_s"])

    print("\n| shape | schedule | " + " | ".join(f"N={n}" for n in worlds) + " |")
    print("|---|---|" + "---|" * len(worlds))
    for s in shapes(args.length):
        for sched in SCHEDULES:
            cells = [f"{slowest(n, f'{s.name}/{sched}') / alone(n, s.name):.2f}" for n in worlds]
            print(f"| {s.name} | {sched} | " + " | ".join(cells) + " |")
    print(
        "\nslowest rank's compute alone (sum over its steps), as a fraction of the single-rank compute:"
    )
    print("\n| shape | schedule | " + " | ".join(f"N={n}" for n in worlds) + " |")
    print("|---|---|" + "---|" * len(worlds))
    for s in shapes(args.length):
        for sched in SCHEDULES:
            cells = [
                f"{slowest(n, f'{s.name}/{sched}', 'compute_s') / alone(n, s.name):.2f}"
                for n in worlds
            ]
            print(f"| {s.name} | {sched} | " + " | ".join(cells) + " |")
    print("\nsingle-rank time measured inside each run (ms): ")
    for n in worlds:
        print(
            f"N={n}: "
            + ", ".join(f"{s.name} {alone(n, s.name) * 1e3:.0f}" for s in shapes(args.length))
        )

    print(
        "\n| shape | N | schedule | steps | compute ms/step | comm ms/step | exposed ms/step | hidden |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in worlds:
        if n == 1:
            continue
        for s in shapes(args.length):
            for sched in SCHEDULES:
                rs = [r["runs"][f"{s.name}/{sched}"] for r in recs[n]]
                st = rs[0]["steps"]
                cells = [
                    statistics.mean(r[f] for r in rs) / st * 1e3
                    for f in ("compute_s", "comm_s", "exposed_s")
                ]
                hid = statistics.mean(r["hidden"] for r in rs)
                print(
                    f"| {s.name} | {n} | {sched} | {st} | "
                    + " | ".join(f"{c:.1f}" for c in cells)
                    + f" | {hid:.2f} |"
                )

    # Calibrate the cost model in each run: flop rate from its single-rank MHA time, link from its
    # ping (the load on this machine drifts between runs).
    mha = shapes(args.length)[0]
    pairs = mha.new * (mha.new + 1) / 2
    hws: dict[int, HardwareModel] = {}
    for n in worlds:
        if n == 1:
            continue
        flops = 4 * mha.heads * mha.head_dim * pairs / alone(n, mha.name)
        bw, lat = recs[n][0]["ping"]
        hws[n] = HardwareModel(flops_per_s=flops, link_bytes_per_s=bw, step_latency_s=lat)
        print(
            f"\ncalibration N={n}: {flops / 1e9:.1f} GFLOP/s per rank, link {bw / 1e9:.2f} GB/s, "
            f"latency {lat * 1e6:.0f} us",
            end="",
        )
    print()
    print("\n| shape | N | cost model picks | measured fastest | measured times (ms) |")
    print("|---|---|---|---|---|")
    agree = total = 0
    for n in worlds:
        if n == 1:
            continue
        for s in shapes(args.length):
            shape = SPShape(s.heads, s.kv_heads, s.head_dim, s.new, s.cached, n, 4)
            pick = choose_schedule(shape, hws[n])
            times = {sched: slowest(n, f"{s.name}/{sched}") for sched in SCHEDULES}
            best = min(times, key=lambda k: times[k])
            agree += pick == best
            total += 1
            tstr = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in times.items())
            print(f"| {s.name} | {n} | {pick} | {best} | {tstr} |")
    print(f"\ncost model matched the measured fastest on {agree}/{total} shapes")

    print(
        f"\n| N | longest prompt, {BUDGET_ROWS} KV rows/rank (layout) | ran: max rows on a rank | +1 token needs |"
    )
    print("|---|---|---|---|")
    for n in worlds:
        b = recs[n][0]["budget"]
        ok = all(r["budget"]["finite"] for r in recs[n])
        over = max_local_tokens(b["length"] + 1, n)
        print(f"| {n} | {b['length']} | {b['max_rows']} (finite={ok}) | {over} rows |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

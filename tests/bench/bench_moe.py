"""MoE expert scheduling benchmark on the trained demo-moe (one run, one machine, side by side).

    python3 tests/bench/bench_moe.py [--prompts 6] [--new-tokens 48] [--plots docs/img]
        [--sections 1,3,4]

1. Tiered store: hit rate, stall and decode time per token vs cache size (10/25/50% of expert
   bytes) for LRU, static popularity, predictive (+prefetch), and Belady (offline, same trace).
   Batch-1 greedy decode of held-out stdlib prompts. Page cache: every checkpoint file is dropped
   (posix_fadvise DONTNEED) before each run and every expert read drops its own range afterwards,
   so each disk-tier read goes to the block device (a virtio disk; its host may still cache).
2. Memory: resident expert bytes vs all-resident at equal outputs, with decode time per token.
3. Regrouping: the served engine capped at the same decode batch, oldest-first vs regrouped:
   distinct experts per batch (actual routing, mean per layer), wait percentiles (scheduling
   steps), and the tiered store's hit rate and stall.
4. Expert parallelism: MoE layer time over 2 gloo ranks per overlap degree, and the tuner's pick.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from moe_bench_cache import MODEL, run_cache, run_memory
from moe_bench_ep import run_ep
from moe_bench_regroup import run_regroup

from batonserve.workers.expert_store.workload import corpus_chunks
from batonserve.workers.models.paths import resolve_model_dir


def plot(cache: dict, out_dir: Path) -> None:  # type: ignore[type-arg]
    """Hit rate and stall vs cache size, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cache["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for policy in ("lru", "popularity", "predictive", "belady"):
        pts = sorted((r.fraction, r) for r in rows if r.policy == policy)
        xs = [100 * f for f, _ in pts]
        axes[0].plot(xs, [100 * r.hit_rate for _, r in pts], marker="o", label=policy)
        if policy != "belady":
            axes[1].plot(xs, [r.stall_ms_per_token for _, r in pts], marker="o", label=policy)
    axes[0].set(
        xlabel="cache size (% of expert bytes)",
        ylabel="hit rate (%)",
        title="demo-moe expert cache hit rate",
    )
    axes[1].set(
        xlabel="cache size (% of expert bytes)",
        ylabel="stall (ms / token)",
        title="expert-load stall per token",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / "moe-cache.png", dpi=110)
    plt.close(fig)


def plot_ep(ep: dict, out_dir: Path) -> None:  # type: ignore[type-arg]
    """MoE layer time vs overlap degree, one line per tokens-per-rank, tuner picks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for tokens, med in ep["median_s"].items():
        ds = [int(d) for d in med]
        line = ax.plot(ds, [1e3 * med[str(d)] for d in ds], marker="o", label=f"{tokens} tok/rank")
        pick = str(ep["tuner"][tokens]["overlap"])
        ax.plot([int(pick)], [1e3 * med[pick]], marker="*", ms=14, color=line[0].get_color())
    ax.set(
        xscale="log",
        xlabel="overlap degree (log)",
        ylabel="MoE layer time (ms)",
        title="2 gloo ranks (star: tuner's pick)",
    )
    degrees = sorted({int(d) for med in ep["median_s"].values() for d in med})
    ax.set_xticks(degrees, [str(d) for d in degrees])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "moe-ep.png", dpi=110)
    plt.close(fig)


def cache_json(cache: dict) -> dict:  # type: ignore[type-arg]
    """The cache section for --json (rows as dicts, NaN as null)."""
    rows = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()}
        for r in cache["rows"]
    ]
    return {**{k: v for k, v in cache.items() if k != "rows"}, "rows": rows}


def main() -> None:
    """Run every section and print the figures against the targets."""
    ap = argparse.ArgumentParser(description="MoE expert scheduling benchmark")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--regroup-requests", type=int, default=16)
    ap.add_argument("--regroup-tokens", type=int, default=48)
    ap.add_argument("--regroup-batch", type=int, default=4)
    ap.add_argument("--max-wait", type=int, default=8)
    ap.add_argument("--ep-tokens", default="32,256,1024")
    ap.add_argument("--ep-overlaps", default="1,2,4,8")
    ap.add_argument("--plots", type=Path, default=Path("docs/img"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sections", default="1,3,4", help="which of 1 (cache + memory), 3, 4 to run")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    results: dict[str, object] = {}
    torch.set_num_threads(1)
    model_dir = resolve_model_dir(MODEL)
    st = (model_dir / "model.safetensors").stat()
    print(f"model {MODEL}: {model_dir}, safetensors {st.st_size} bytes, mtime {st.st_mtime:.0f}")
    prompts = corpus_chunks(model_dir, "heldout", args.prompts, args.prompt_len)

    if "1" in sections:
        print("\n[1-2] tiered expert store, batch-1 decode")
        cache = run_cache(prompts, args.new_tokens, [0.10, 0.25, 0.50])
        plot(cache, args.plots)
        rows = {(r.policy, r.fraction): r for r in cache["rows"]}
        p25, l25, b25 = rows[("predictive", 0.25)], rows[("lru", 0.25)], rows[("belady", 0.25)]
        print(
            f"  demands {cache['demands']}, tokens {cache['tokens']}, all experts "
            f"{cache['all_expert_bytes']} bytes, resident decode {cache['resident_ms_per_token']:.2f} "
            f"(again {cache['resident_ms_per_token_again']:.2f}) ms/token"
        )
        print(
            f"  target predictive >= 0.8 x belady @25%: {p25.hit_rate:.3f} vs {0.8 * b25.hit_rate:.3f}"
            f" -> {'MET' if p25.hit_rate >= 0.8 * b25.hit_rate else 'NOT MET'}"
        )
        print(
            f"  target predictive >= lru + 15 pts @25%: {100 * p25.hit_rate:.1f} vs "
            f"{100 * l25.hit_rate + 15:.1f} -> {'MET' if p25.hit_rate >= l25.hit_rate + 0.15 else 'NOT MET'}"
        )
        print("\n[2] memory vs decode time (predictive + prefetch, interleaved with all-resident)")
        mem = run_memory(prompts, args.new_tokens, [0.25, 0.10])
        print(f"  all-resident decode {mem['resident_ms']:.2f} ms/token")
        for frac in ("25%", "10%"):
            m = mem[frac]
            ok = m["saved"] >= 0.75 and m["ratio"] <= 2 and m["same_logits"]
            verdict = ("MET" if ok else "NOT MET") if frac == "25%" else "(extra point)"
            print(
                f"  cache {frac}: {m['saved']:.1%} less expert memory, decode {m['ms']:.2f} ms/token = "
                f"{m['ratio']:.2f}x, hit {m['hit_rate']:.3f}, same tokens {m['same_tokens']}, "
                f"same logits {m['same_logits']} -> {verdict}"
            )
        results["cache"] = cache_json(cache)
        results["memory"] = mem

    if "3" in sections:
        print("\n[3] token regrouping")
        reg_prompts = corpus_chunks(model_dir, "heldout", args.regroup_requests, 24)
        reg = (reg_prompts, args.regroup_tokens, args.regroup_batch, args.max_wait)
        off, off_tokens = run_regroup(*reg, mode="off")
        fifo, fifo_tokens = run_regroup(*reg, mode="fifo")
        grp, grp_tokens = run_regroup(*reg, mode="regroup")
        cut = 1 - grp["distinct_per_layer"] / fifo["distinct_per_layer"]
        same = off_tokens == fifo_tokens == grp_tokens
        print(f"  off:     {off}\n  fifo:    {fifo}\n  regroup: {grp}\n  same tokens: {same}")
        print(
            f"  decode time regroup / fifo {grp['ms_per_token'] / fifo['ms_per_token']:.2f}, "
            f"regroup / off {grp['ms_per_token'] / off['ms_per_token']:.2f}"
        )
        met = cut >= 0.25 and grp["wait_max"] <= args.max_wait and same
        print(
            f"  target >= 25% fewer distinct experts at bounded p99 wait: {cut:.1%} fewer, p99 wait "
            f"{grp['wait_p99']:.0f} (bound {args.max_wait}) -> {'MET' if met else 'NOT MET'}"
        )
        results["regroup"] = {"off": off, "fifo": fifo, "regroup": grp}

    if "4" in sections:
        print("\n[4] expert parallelism, 2 gloo ranks, layer 1 of demo-moe in fp32")
        with tempfile.TemporaryDirectory() as tmp:
            ep = run_ep(
                model_dir,
                Path(tmp),
                [int(t) for t in args.ep_tokens.split(",")],
                [int(o) for o in args.ep_overlaps.split(",")],
            )
        ep_ok = True
        for tokens, med in ep["median_s"].items():
            best = min(med, key=med.get)
            pick = str(ep["tuner"][tokens]["overlap"])
            gap = med[pick] / med[best] - 1
            ep_ok &= gap <= 0.05
            cells = "  ".join(f"d={o}: {1e3 * t:.2f} ms" for o, t in med.items())
            print(f"  {tokens} tokens/rank: {cells} | best d={best}, tuner d={pick} ({gap:+.1%})")
        print(f"  target tuner within 5% of best: {'MET' if ep_ok else 'NOT MET'}")
        plot_ep(ep, args.plots)
        results["ep"] = ep

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""A MoE model larger than the worker's memory: experts streamed into the tiers at start-up and
served at 20% / 25% / 50% fast-tier residency, LRU vs predictive (with and without prefetch),
against all-resident, on a shared machine whose load changes from second to second.

    python3 tests/bench/bench_moe_offload.py [--model DIR] [--rounds 5] [--json FILE] [--keep]

Without --model it writes a random Mixtral under --workdir (fp16, 4 layers x 32 experts of 6 MB =
768 MB of experts) with the tiny test tokenizer. The predictor is trained by the real CLI,
`batonserve train-predictor --model DIR` (built-in corpus), into a private identity-keyed cache
(BATONSERVE_CACHE_DIR) where the predictive runners find it, as serving does.

Reliability on a noisy machine: every configuration gets its own runner, built once; then each
round decodes the same held-out prompts (greedy, batch 1) through every runner, in an order that
rotates from round to round, so a burst of load from other jobs hits all configurations alike.
Tokens/s is reported as a ratio to the all-resident runner of the same round; the table shows
medians over rounds (and the range), with the load average. Greedy tokens must be identical
across configurations and rounds (the script fails otherwise). Hit rate and stall are measured
over the decode steps only (prefill excluded). The worker's memory is measured in a fresh
process per residency (predictive + prefetch): the highest anonymous resident memory (RssAnon,
sampled every ms) the runner adds while loading and decoding one prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the testkit package

MB = 1 << 20


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_model(workdir: Path, hidden: int, inter: int, layers: int, experts: int) -> Path:
    """The random Mixtral and its tokenizer (reused when already written)."""
    from testkit.big_mixtral import CONFIG, write_big_mixtral
    from testkit.hf_tiny import build_tokenizer

    path = workdir / f"mixtral-{layers}x{experts}-{hidden}-{inter}"
    if not (path / "model.safetensors").is_file():
        cfg = dict(CONFIG, hidden_size=hidden, intermediate_size=inter)
        cfg |= {"num_hidden_layers": layers, "num_local_experts": experts}
        say(f"writing random Mixtral to {path}")
        write_big_mixtral(path, cfg)
        build_tokenizer().save(str(path / "tokenizer.json"))
    return path


def train_predictor(model: Path, cache: Path, chunks: int, steps: int) -> list[str]:
    """`batonserve train-predictor --model DIR` into `cache`; its stdout lines (recall, path)."""
    cmd = [
        shutil.which("batonserve") or "batonserve",
        "train-predictor",
        "--model",
        str(model),
        "--cache-dir",
        str(cache),
        "--length",
        "64",
        "--max-chunks",
        str(chunks),
        "--steps",
        str(steps),
    ]
    say("running: " + " ".join(cmd))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    lines = [ln for ln in out.splitlines() if ln.strip()]
    for ln in lines:
        say(ln)
    return lines


@dataclass
class Variant:
    """One configuration's runner and what its visits measured."""

    policy: str  # "" = all experts resident
    fraction: float
    prefetch: bool = False  # prefetch the predictor's forecasts in the background
    runner: Any = None
    tok_s: list[float] = field(default_factory=list)  # per round
    ratio: list[float] = field(default_factory=list)  # per round, / all-resident of that round
    hits: int = 0
    accesses: int = 0
    stall_s: list[float] = field(default_factory=list)  # per round, decode steps only
    decode_tokens: int = 0  # per round
    prefetch_pr: tuple[float, float] = (0.0, 0.0)  # precision, recall (whole run)
    tokens: list[list[int]] | None = None

    @property
    def name(self) -> str:
        plus = "+prefetch" if self.prefetch else ""
        return f"{self.policy or 'all-resident'}{plus} {self.fraction:.0%}"


def make_runner(model: Path, v: Variant, max_len: int) -> Any:
    from batonserve.workers.config import EngineConfig
    from batonserve.workers.model_runner import ModelRunner

    cfg = EngineConfig(
        device="cpu",
        dtype="auto",
        expert_cache_policy=v.policy,
        expert_cache_fraction=v.fraction,
        expert_prefetch=v.prefetch,  # LRU is the plain demand-loading baseline
        num_kv_blocks=-(-max_len // 16) + 1,
        block_size=16,
    )
    return ModelRunner(model, cfg)


def _counts(store: Any) -> tuple[int, int, float]:
    """(fast-tier hits, demand accesses, stall seconds) so far."""
    st = store.snapshot_stats()
    return sum(map(sum, st.expert_hits)), st.demand_accesses, st.stall_seconds


def visit(v: Variant, prompts: list[list[int]], new: int) -> float:
    """Decode every prompt through v's runner; returns decode tokens/s, adds hits and stall."""
    from batonserve.workers.expert_store.decode import greedy_decode

    store = v.runner.expert_store
    tokens, decode_s, n, stall = [], 0.0, 0, 0.0
    for p in prompts:
        before: list[tuple[int, int, float]] = []
        if store is not None:
            store.drain()  # the previous prompt's prefetches do not spill into this one

        def mark(store: Any = store, before: list = before) -> None:
            if store is not None:
                before.append(_counts(store))

        res = greedy_decode(v.runner, [p], new, after_prefill=mark)
        tokens.append(res.tokens[0])
        decode_s += sum(res.decode_s)
        n += len(res.decode_s)
        if store is not None:
            h, a, s = _counts(store)
            v.hits += h - before[0][0]
            v.accesses += a - before[0][1]
            stall += s - before[0][2]
    if v.tokens is None:
        v.tokens = tokens
    elif tokens != v.tokens:
        raise SystemExit(f"{v.name}: tokens changed from one round to the next")
    v.stall_s.append(stall)
    v.decode_tokens = n
    return n / decode_s


MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, threading, time
    import torch
    from batonserve.workers.config import EngineConfig
    from batonserve.workers.expert_store.decode import greedy_decode
    from batonserve.workers.model_runner import ModelRunner
    import batonserve.workers.expert_store.store, batonserve.workers.expert_store.policies
    torch.set_num_threads(1)
    def anon():  # bytes the process allocated (not the safetensors pages it maps: page cache)
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("RssAnon:"))
    high, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            high[0] = max(high[0], anon())
            time.sleep(0.001)
    base = anon()
    threading.Thread(target=sample, daemon=True).start()
    policy, frac = sys.argv[2], float(sys.argv[3])
    cfg = EngineConfig(device="cpu", dtype="auto", expert_cache_policy=policy,
                       expert_cache_fraction=frac, expert_prefetch=policy == "predictive",
                       num_kv_blocks=5, block_size=16)
    r = ModelRunner(sys.argv[1], cfg)
    greedy_decode(r, [list(range(2, 34))], 16)
    if r.expert_store is not None:
        r.expert_store.drain()
    done.set()
    nonexpert = sum(p.numel() * p.element_size() for p in r.model.parameters())
    budget = r.expert_store.fast.budget if r.expert_store is not None else 0
    print(json.dumps({"grew": max(high[0], anon()) - base, "nonexpert": nonexpert,
                      "fast_budget": budget}))
    """
)


def measure_memory(model: Path, policy: str, frac: float) -> dict[str, int]:
    """A fresh process: RssAnon growth across load + one decode, with the budget it was given."""
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(model), policy, str(frac)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="MoE model dir (default: random)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/batonserve-moe-offload"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fractions", default="0.2,0.25,0.5")
    ap.add_argument(
        "--policies",
        default="lru,predictive,predictive+prefetch",
        help="cache policies; a '+prefetch' suffix also prefetches the predictor's forecasts",
    )
    ap.add_argument("--train-chunks", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the written model (default: delete)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cache = args.workdir / "cache"
    os.environ["BATONSERVE_CACHE_DIR"] = str(cache)  # the runners look for the predictor here
    from batonserve.workers.expert_store.predictor_cache import find_predictor
    from batonserve.workers.expert_store.predictor_training import (
        DEFAULT_CORPUS,
        split_documents,
        token_chunks,
    )

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(
        args.workdir, args.hidden, args.inter, args.layers, args.experts
    )
    try:
        report = run(args, model, find_predictor, DEFAULT_CORPUS, split_documents, token_chunks)
    finally:
        if args.model is None and not args.keep:
            shutil.rmtree(model, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def run(args, model, find_predictor, corpus, split_documents, token_chunks) -> dict:  # type: ignore[no-untyped-def]
    """Train (if needed), build every runner, interleave the rounds, print the table."""
    t_start = time.time()
    train_lines: list[str] = []
    if find_predictor(model) is None:
        train_lines = train_predictor(
            model, args.workdir / "cache", args.train_chunks, args.train_steps
        )
    found = find_predictor(model)
    assert found is not None, "train-predictor did not write where serving looks"
    say(f"predictor for {model.name}: {found}")
    _, held = split_documents(corpus.read_text())
    prompts = token_chunks(model / "tokenizer.json", held, args.prompt_len, args.prompts)
    st_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    max_len = args.prompt_len + args.new_tokens
    fractions = [float(f) for f in args.fractions.split(",")]
    variants = [Variant("", 1.0)] + [
        Variant(p.removesuffix("+prefetch"), f, p.endswith("+prefetch"))
        for f in fractions
        for p in args.policies.split(",")
    ]
    for v in variants:
        t0 = time.perf_counter()
        v.runner = make_runner(model, v, max_len)
        say(f"built {v.name} in {time.perf_counter() - t0:.1f}s")
    loads: list[float] = []
    for rnd in range(args.rounds):
        k = rnd % len(variants)
        order = variants[k:] + variants[:k]  # rotate: no configuration always runs first
        loads.append(os.getloadavg()[0])
        tok_s = {v.name: visit(v, prompts, args.new_tokens) for v in order}
        loads.append(os.getloadavg()[0])
        ref = tok_s[variants[0].name]
        for v in variants:
            v.tok_s.append(tok_s[v.name])
            v.ratio.append(tok_s[v.name] / ref)
        say(f"round {rnd + 1}: " + ", ".join(f"{n} {t:.1f}" for n, t in tok_s.items()))
    for v in variants:
        st = v.runner.expert_store
        if st is not None:
            snap = st.snapshot_stats()
            v.prefetch_pr = (snap.prefetch_precision, snap.prefetch_recall)
        v.runner.close()
    ref_tokens = variants[0].tokens
    same = {v.name: v.tokens == ref_tokens for v in variants}
    say("measuring worker memory in fresh processes")
    # With prefetch: the most the store holds (budget plus experts in flight).
    memory = {f: measure_memory(model, "predictive", f) for f in fractions}
    memory[1.0] = measure_memory(model, "", 1.0)
    return report(args, model, st_bytes, variants, same, memory, loads, train_lines, t_start)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def report(args, model, st_bytes, variants, same, memory, loads, train_lines, t_start) -> dict:  # type: ignore[no-untyped-def]
    """Print the markdown table and the notes; the same as a dict for --json."""
    print(
        "| fast tier | policy | worker memory budget / measured (MB) | model / budget "
        "| hit rate | stall ms/token | decode tok/s | vs all-resident | same tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for v in variants:
        m = memory[v.fraction]
        budget = m["nonexpert"] + m["fast_budget"] if v.policy else m["nonexpert"]
        hit = v.hits / v.accesses if v.accesses else 1.0
        stall = [1e3 * s / v.decode_tokens for s in v.stall_s]
        pr = v.prefetch_pr
        pf = f" + prefetch (precision {pr[0]:.2f}, recall {pr[1]:.2f})" if v.prefetch else ""
        label = v.policy + pf if v.policy else "all-resident"
        print(
            f"| {v.fraction:.0%} | {label} | {budget / MB:.0f} / {m['grew'] / MB:.0f} "
            f"| {st_bytes / budget:.1f}x | {hit:.3f} | {_med(stall)} | {_med(v.tok_s)} "
            f"| {_med(v.ratio)} | {same[v.name]} |"
        )
        rows.append(
            {
                "policy": v.policy or "all-resident",
                "prefetch": v.prefetch,
                "fraction": v.fraction,
                "budget_bytes": budget,
                "measured_anon_bytes": m["grew"],
                "hit_rate": round(hit, 4),
                "stall_ms_per_token": [round(s, 3) for s in stall],
                "decode_tok_s": [round(t, 2) for t in v.tok_s],
                "ratio": [round(r, 3) for r in v.ratio],
                "prefetch_precision": round(v.prefetch_pr[0], 3),
                "prefetch_recall": round(v.prefetch_pr[1], 3),
                "same_tokens": same[v.name],
            }
        )
    if not all(same.values()):
        raise SystemExit("greedy tokens differ between configurations: " + json.dumps(same))
    print(
        f"\nmodel {model.name}: {st_bytes / MB:.0f} MB on disk; {args.rounds} rounds x "
        f"{args.prompts} prompts x {args.new_tokens} tokens; load average (1 min) median "
        f"{statistics.median(loads):.1f}, range {min(loads):.1f}-{max(loads):.1f}; "
        f"{time.time() - t_start:.0f} s in all"
    )
    for ln in train_lines:
        print("train-predictor: " + ln)
    return {"model_bytes": st_bytes, "rows": rows, "load_avg": loads, "train": train_lines}


if __name__ == "__main__":
    main()

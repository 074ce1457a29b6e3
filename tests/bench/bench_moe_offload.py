"""A MoE model larger than the worker's memory: experts streamed into the tiers at start-up and
served at 25% / 50% fast-tier residency, predictive (+ prefetch) vs LRU, against all-resident.

    python3 tests/bench/bench_moe_offload.py [--model DIR] [--json FILE] [--cold]

Without --model it writes a random Mixtral (fp16, 4 layers x 16 experts of 12.6 MB = 805 MB of
experts) with the tiny test tokenizer, trains its predictor with the train-predictor code path
(built-in corpus) into a private cache, then decodes held-out corpus prompts one at a time
(greedy) through one runner per configuration. Prints hit rate, stall per token, decode tokens/s,
the worker's memory (non-expert weights + fast-tier budget) and whether the tokens equal the
all-resident run's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

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


def run(model: Path, policy: str, frac: float, prompts: list[list[int]], new: int, cold: bool):  # type: ignore[no-untyped-def]
    """Decode every prompt in turn through one runner; the measures of this configuration."""
    from batonserve.workers.config import EngineConfig
    from batonserve.workers.expert_store.decode import greedy_decode
    from batonserve.workers.model_runner import ModelRunner

    cfg = EngineConfig(
        device="cpu",
        dtype="auto",
        expert_cache_policy=policy,  # type: ignore[arg-type]
        expert_cache_fraction=frac,
        expert_prefetch=policy == "predictive",  # LRU is the plain demand-loading baseline
        num_kv_blocks=-(-(max(map(len, prompts)) + new) // 16) + 1,
        block_size=16,
    )
    t0 = time.perf_counter()
    r = ModelRunner(model, cfg)
    load_s = time.perf_counter() - t0
    store = r.expert_store
    if store is not None and cold:
        store.disk.drop_page_cache = True
        store.disk.drop_all()
    tokens, decode_s, n_decode = [], 0.0, 0
    try:
        for p in prompts:
            res = greedy_decode(r, [p], new)
            tokens.append(res.tokens[0])
            decode_s += sum(res.decode_s)
            n_decode += len(res.decode_s)
        if store is not None:
            store.drain()
    finally:
        r.close()
    params = sum(p.numel() * p.element_size() for p in r.model.parameters())
    out = {
        "policy": policy or "all-resident",
        "fraction": frac if policy else 1.0,
        "load_s": round(load_s, 2),
        "decode_tok_s": round(n_decode / decode_s, 2),
        "tokens": tokens,
        "model_params_bytes": params,
    }
    if store is not None:
        st = store.stats
        out |= {
            "fast_budget_bytes": store.fast.budget,
            "hit_rate": round(st.hit_rate, 4),
            "stall_ms_per_token": round(1e3 * st.stall_per_token_s, 3),
            "prefetch_precision": round(st.prefetch_precision, 3),
            "prefetch_recall": round(st.prefetch_recall, 3),
            "disk_reads_mb": round(st.tiers["disk"].bytes_in / MB, 1),
        }
    say(
        f"{out['policy']} {out['fraction']:.0%}: {out['decode_tok_s']} tok/s, "
        f"hit {out.get('hit_rate', 1.0)}, stall {out.get('stall_ms_per_token', 0)} ms/token"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="MoE model dir (default: random)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/batonserve-moe-offload"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--fractions", default="0.25,0.5")
    ap.add_argument("--policies", default="lru,predictive")
    ap.add_argument("--cold", action="store_true", help="drop the page cache (every read cold)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("BATONSERVE_CACHE_DIR", str(args.workdir / "cache"))
    from batonserve.workers.expert_store.predictor_cache import find_predictor
    from batonserve.workers.expert_store.predictor_training import (
        DEFAULT_CORPUS,
        split_documents,
        token_chunks,
        train_for_model,
    )
    from batonserve.workers.models.config import ModelConfig

    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(
        args.workdir, args.hidden, args.inter, args.layers, args.experts
    )
    if find_predictor(model) is None:
        rep = train_for_model(
            model, length=64, max_chunks=48, steps=150, expert_cache_fraction=0.5, progress=say
        )
        say(f"predictor: held-out recall {rep.recall} (next layer {rep.recall_next_layer})")
    _, held = split_documents(DEFAULT_CORPUS.read_text())
    prompts = token_chunks(model / "tokenizer.json", held, args.prompt_len, args.prompts)
    mc = ModelConfig.from_dir(model)
    st_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    say(f"model {model.name}: {st_bytes / MB:.0f} MB on disk, {mc.num_layers} layers")
    results = [run(model, "", 1.0, prompts, args.new_tokens, False)]
    for frac in [float(f) for f in args.fractions.split(",")]:
        for policy in args.policies.split(","):
            results.append(run(model, policy, frac, prompts, args.new_tokens, args.cold))
    results.append(run(model, "", 1.0, prompts, args.new_tokens, False))  # drift check
    ref = results[0]
    print(
        "| cache | policy | worker memory (MB) | model / worker | hit rate | stall ms/token "
        "| decode tok/s | vs all-resident | same tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    resident_tok_s = (results[0]["decode_tok_s"] + results[-1]["decode_tok_s"]) / 2
    for res in results[1:-1]:
        mem = res["model_params_bytes"] + res["fast_budget_bytes"]
        print(
            f"| {res['fraction']:.0%} | {res['policy']} | {mem / MB:.0f} | {st_bytes / mem:.1f}x "
            f"| {res['hit_rate']:.3f} | {res['stall_ms_per_token']:.2f} | {res['decode_tok_s']:.1f} "
            f"| {res['decode_tok_s'] / resident_tok_s:.2f} | {res['tokens'] == ref['tokens']} |"
        )
    print(
        f"all-resident: {results[0]['decode_tok_s']} / {results[-1]['decode_tok_s']} tok/s "
        f"(first / last run), {results[0]['model_params_bytes'] / MB:.0f} MB of weights"
    )
    if args.json:
        for res in results:
            res.pop("tokens")
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

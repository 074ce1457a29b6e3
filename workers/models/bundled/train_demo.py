"""Train the bundled `demo` (Llama) and `demo-moe` (Mixtral) models on CPython's stdlib source.

Usage:
    python3 -m batonserve.workers.models.bundled.train_demo --model tokenizer
    python3 -m batonserve.workers.models.bundled.train_demo --model demo [--steps N] [--threads T]
    python3 -m batonserve.workers.models.bundled.train_demo --model demo-moe [--steps N] [--threads T]

Needs `transformers` (in the `test` extra: `pip install -e .[test]`) for LlamaForCausalLM /
MixtralForCausalLM. The tokenizer (byte-level BPE, shared by both models) is trained by the first
step and reused; a model run trains it too if it is missing. Deterministic: seeded, fixed file
order, one split by path hash. Progress goes to stderr; the loss curve goes to
docs/img/<model>-loss.png and the metrics to docs/metrics/<model>.json. The corpus is the Python
standard library (PSF licence), see bundled/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from batonserve.workers.models.bundled import demo_corpus as dc
from batonserve.workers.models.bundled import demo_export as dx
from batonserve.workers.models.paths import BUNDLED_DIR

REPO_ROOT = BUNDLED_DIR.parents[2]
SEED = 1234
SEQ_LEN = 256
MAX_POS = 2048
SAMPLE_PROMPTS = (
    "import os\n",
    "    for i in range(",
    "class Point:\n    def __init__(self, x, y):\n",
)
ROUTING_TEXT_TOKENS = 4096  # held-out tokens for the final routing table


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and schedule settings for one run."""

    steps: int
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_windows: int = 16  # during training; the final eval uses all held-out windows


def build_model(name: str, vocab: int) -> Any:
    """A fresh, seeded transformers model for `name` ("demo" or "demo-moe")."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,  # GQA: 4 query heads share each KV head
        head_dim=32,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(SEED)
    if name == "demo":
        return LlamaForCausalLM(LlamaConfig(intermediate_size=512, **common))
    if name == "demo-moe":
        cfg = MixtralConfig(
            intermediate_size=64,  # per expert: fine-grained experts
            num_local_experts=16,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.001,  # Mixtral's default
            output_router_logits=True,  # adds the load-balancing loss during training
            sliding_window=None,
            **common,
        )
        return MixtralForCausalLM(cfg)
    raise ValueError(
        f"--model: unknown model {name!r} (expected 'demo', 'demo-moe' or 'tokenizer')"
    )


def ensure_tokenizer(corpus: dc.Corpus) -> Tokenizer:
    """Load the shared tokenizer from demo/, training and writing it into both dirs if missing."""
    path = BUNDLED_DIR / "demo" / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = dc.train_tokenizer(corpus)
    for name in ("demo", "demo-moe"):
        dc.write_tokenizer_files(tok, BUNDLED_DIR / name, MAX_POS)
    return tok


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def heldout_windows(stream: torch.Tensor, limit: int | None) -> torch.Tensor:
    """Non-overlapping `[n, SEQ_LEN + 1]` windows of the held-out stream (first `limit`)."""
    n = (len(stream) - 1) // SEQ_LEN
    n = n if limit is None else min(n, limit)
    return torch.stack([stream[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in range(n)])


@torch.no_grad()
def eval_loss(model: Any, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of the LM alone over the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(input_ids=w[:, :-1]).logits  # [B, S, V]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += w[:, 1:].numel()
    model.train()
    return total / count


def param_groups(model: Any, wd: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}]


def log(msg: str) -> None:
    """Progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)


def train(name: str, s: TrainSettings) -> dict[str, Any]:
    """Train one model, save it into its bundled dir, and return its metrics."""
    t_start = time.monotonic()
    corpus = dc.load_corpus()
    tok = ensure_tokenizer(corpus)
    train_ids = dc.token_stream(tok, corpus.train)
    held_ids = dc.token_stream(tok, corpus.heldout)
    log(f"[{name}] corpus: {len(corpus.train)} train files ({len(train_ids)} tokens), "
        f"{len(corpus.heldout)} held-out files ({len(held_ids)} tokens)")  # fmt: skip
    model = build_model(name, tok.get_vocab_size())
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[{name}] {n_params / 1e6:.2f}M parameters ({n_params * 2 / 2**20:.1f} MiB in fp16)")
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay), lr=s.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(SEED)
    eval_w = heldout_windows(held_ids, s.eval_windows)
    curve: list[dict[str, float]] = []
    tokens_per_step = s.batch_size * SEQ_LEN
    t0 = time.monotonic()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, s)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (s.batch_size,), generator=gen)
        batch = torch.stack([train_ids[i : i + SEQ_LEN + 1] for i in starts.tolist()])
        # [B, SEQ_LEN + 1]; transformers shifts the labels itself, so SEQ_LEN targets per row
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm_loss = float(out.loss)
        if getattr(out, "aux_loss", None) is not None:  # Mixtral: loss = lm + coef * aux
            lm_loss -= model.config.router_aux_loss_coef * float(out.aux_loss)
        point = {"step": step + 1, "train_loss": lm_loss}
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            point["heldout_loss"] = eval_loss(model, eval_w)
        curve.append(point)
        if (step + 1) % 10 == 0 or "heldout_loss" in point:
            el = time.monotonic() - t0
            tps = (step + 1) * tokens_per_step / el
            eta = el / (step + 1) * (s.steps - step - 1)
            extra = f" heldout {point['heldout_loss']:.3f}" if "heldout_loss" in point else ""
            log(f"[{name}] step {step + 1}/{s.steps} loss {point['train_loss']:.3f}{extra} "
                f"lr {lr_at(step, s):.2e} {tps:.0f} tok/s ETA {eta / 60:.1f} min")  # fmt: skip
    train_s = time.monotonic() - t0
    return finish(name, model, tok, held_ids, s, curve, n_params, train_s, t_start)


def finish(
    name: str,
    model: Any,
    tok: Tokenizer,
    held_ids: torch.Tensor,
    s: TrainSettings,
    curve: list[dict[str, float]],
    n_params: int,
    train_s: float,
    t_start: float,
) -> dict[str, Any]:
    """Final eval, save, reload check, routing table, samples, plot and metrics JSON."""
    model.eval()
    model.config.output_router_logits = False
    all_w = heldout_windows(held_ids, None)
    final_held = eval_loss(model, all_w)
    log(f"[{name}] final held-out loss {final_held:.4f} on {all_w[:, 1:].numel()} tokens")
    out_dir = BUNDLED_DIR / name
    tensors = dx.save_model_dir(model, out_dir, eos_id=0)
    probe = held_ids[:128]
    diff = dx.verify_reload(model, out_dir, probe)
    log(f"[{name}] reload check: max |logit diff| = {diff}")
    if diff != 0.0:
        raise RuntimeError(f"{name}: transformers reload differs from the trained model by {diff}")
    metrics: dict[str, Any] = {
        "model": name,
        "parameters": n_params,
        "safetensors_bytes": (out_dir / "model.safetensors").stat().st_size,
        "tensor_names_sample": sorted(tensors)[:8],
        "settings": asdict(s),
        "seq_len": SEQ_LEN,
        "tokens_trained": s.steps * s.batch_size * SEQ_LEN,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.monotonic() - t_start, 1),
        "threads": torch.get_num_threads(),
        "final_train_loss_avg_last_20": sum(p["train_loss"] for p in curve[-20:])
        / len(curve[-20:]),
        "heldout_loss": final_held,
        "heldout_tokens": int(all_w[:, 1:].numel()),
        "curve": curve,
    }
    return report(name, tok, held_ids, metrics)


def report(
    name: str, tok: Tokenizer, held_ids: torch.Tensor, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Add the routing table and greedy samples of the saved model; write JSON and PNG."""
    reloaded = _reload(BUNDLED_DIR / name)
    if name == "demo-moe":
        rs = dx.routing_stats(dx.hf_router_logits(reloaded, held_ids[:ROUTING_TEXT_TOKENS]), 2)
        metrics["routing"] = asdict(rs) | {"uniform_entropy": rs.uniform_entropy}
        log(f"[{name}] routing entropy per layer {[round(e, 3) for e in rs.entropy]} "
            f"(uniform {rs.uniform_entropy:.3f})")  # fmt: skip
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        new = dx.greedy_sample(reloaded, tok.encode(prompt).ids, 96)
        samples[prompt] = tok.decode(new)
    metrics["samples"] = samples
    log(f"[{name}] sample:\n{SAMPLE_PROMPTS[0]}{samples[SAMPLE_PROMPTS[0]]}")
    write_outputs(name, metrics)
    return metrics


def _reload(out_dir: Path) -> Any:
    """The saved model reloaded by transformers in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()


def write_outputs(name: str, metrics: dict[str, Any]) -> None:
    """Write docs/metrics/<name>.json and the loss-curve PNG docs/img/<name>-loss.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mdir, idir = REPO_ROOT / "docs" / "metrics", REPO_ROOT / "docs" / "img"
    mdir.mkdir(parents=True, exist_ok=True)
    idir.mkdir(parents=True, exist_ok=True)
    (mdir / f"{name}.json").write_text(json.dumps(metrics, indent=1) + "\n")
    curve = metrics["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p["step"] for p in curve], [p["train_loss"] for p in curve], lw=0.6, label="train")
    held = [p for p in curve if "heldout_loss" in p]
    ax.plot(
        [p["step"] for p in held], [p["heldout_loss"] for p in held], "o-", ms=3, label="held-out"
    )
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=f"{name} training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(idir / f"{name}-loss.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", required=True, choices=["tokenizer", "demo", "demo-moe"])
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="recompute routing table, samples and plot from the saved model and metrics JSON",
    )
    args = p.parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps: must be >= 1")
    torch.set_num_threads(args.threads)
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    if args.model == "tokenizer":
        tok = ensure_tokenizer(dc.load_corpus())
        log(f"tokenizer: {tok.get_vocab_size()} tokens in {BUNDLED_DIR / 'demo'}")
        return 0
    if args.report_only:
        corpus = dc.load_corpus()
        metrics = json.loads((REPO_ROOT / "docs" / "metrics" / f"{args.model}.json").read_text())
        tok = ensure_tokenizer(corpus)
        report(args.model, tok, dc.token_stream(tok, corpus.heldout), metrics)
        return 0
    train(args.model, TrainSettings(steps=args.steps, batch_size=args.batch_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

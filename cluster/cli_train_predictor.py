"""`batonserve train-predictor`: train the routing predictor of a MoE model for the expert store.

The predictor (ExpertFlow's forecasts: prefetch, the popularity and predictive cache policies,
token regrouping) is written to the user cache keyed by the model's identity, where serving finds
it: $BATONSERVE_CACHE_DIR, else $XDG_CACHE_HOME/batonserve, else ~/.cache/batonserve.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `train-predictor` subcommand."""
    p = sub.add_parser(
        "train-predictor", help="train a MoE model's routing predictor into the user cache"
    )
    p.add_argument("--model", required=True, help="Hugging Face model directory (or demo-moe)")
    p.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="UTF-8 text, documents separated by lines holding only '---' (default: built-in)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the probe training")
    p.add_argument("--length", type=int, default=128, help="tokens per recorded chunk")
    p.add_argument("--max-chunks", type=int, default=64, help="training chunks at most")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per probe")
    p.add_argument("--device", default="cpu", help="device of the recording forwards")
    p.add_argument(
        "--expert-cache-fraction",
        type=float,
        default=0.25,
        help="share of expert bytes resident while recording (the rest stream from disk)",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="override the user cache dir")
    p.add_argument("--out", type=Path, default=None, help="write here instead of the cache")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, print progress and held-out recall, write the predictor."""
    from batonserve.workers.expert_store.predictor_cache import CACHE_ENV
    from batonserve.workers.expert_store.predictor_training import train_for_model
    from batonserve.workers.models.paths import resolve_model_dir

    for name in ("length", "max_chunks", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.cache_dir is not None:
        os.environ[CACHE_ENV] = str(args.cache_dir)
    model_dir = resolve_model_dir(args.model)

    def say(msg: str) -> None:
        print(f"train-predictor: {msg}", file=sys.stderr, flush=True)

    report = train_for_model(
        model_dir,
        args.corpus,
        seed=args.seed,
        length=args.length,
        max_chunks=args.max_chunks,
        steps=args.steps,
        device=args.device,
        expert_cache_fraction=args.expert_cache_fraction,
        out=args.out,
        progress=say,
    )
    for m, r in report.recall.items():
        print(
            f"held-out recall@{m}: {r:.3f} over all layer pairs, "
            f"{report.recall_next_layer[m]:.3f} one layer ahead "
            f"({report.heldout_tokens} held-out tokens, {report.train_tokens} training tokens)"
        )
    print(f"wrote {report.path} in {report.seconds:.1f}s")
    return 0

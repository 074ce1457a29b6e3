"""`batonserve generate`: one prompt in, its completion out (offline: in-process, no Ray)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from batonserve.cluster.client import add_connection_args


def register(subparsers: Any) -> None:
    """Add the `generate` subcommand."""
    p = subparsers.add_parser("generate", help="generate a completion for one prompt")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--offline",
        action="store_true",
        help="run the engine in this process (no server, no Ray)",
    )
    p.add_argument("--model", default="demo", help="model directory or bundled name (demo)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past EOS")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_connection_args(p)  # --target, --ca-file, --token-file (remote mode)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand."""
    if not args.offline:  # remote: stream from a running `batonserve serve`
        from batonserve.cluster.client import run_remote_generate

        return run_remote_generate(args)
    from batonserve.workers.engine import Engine
    from batonserve.workers.sampling_params import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    t0 = time.monotonic()
    print(f"batonserve: loading model {args.model} ...", file=sys.stderr, flush=True)
    engine = Engine.from_model(args.model, device=args.device, dtype=args.dtype)
    print(
        f"batonserve: loaded {engine.model_config.architecture} in "
        f"{time.monotonic() - t0:.1f}s on {engine.runner.device}; generating ...",
        file=sys.stderr,
        flush=True,
    )
    out = engine.generate([args.prompt], params)[0]
    if args.json:
        record = {"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason}
        print(json.dumps(record, ensure_ascii=False))
    else:
        print(out.text)
    return 0

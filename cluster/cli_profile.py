"""`batonserve profile`: time batonserve's own engine over a grid and write a performance table.

The table has the format of Splitwise's profile (`cluster/sim/data/splitwise_perf_model.csv`),
so `batonserve plan --perf-table FILE --model MODEL` simulates clusters of this very engine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from batonserve.cluster.sim.perf_model import TableRow, write_table

if TYPE_CHECKING:
    from batonserve.workers.engine import Engine


def _ints(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return vals


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `profile` subcommand."""
    p = sub.add_parser("profile", help="time the engine's prefill and decode steps into a table")
    p.add_argument("--model", default="demo", help="bundled model name or Hugging Face directory")
    p.add_argument("--output", required=True, help="CSV file to write")
    p.add_argument("--hardware", default="cpu", help="name of this machine type in the table")
    p.add_argument("--device", default="cpu", help="engine device (cpu, cuda, ...)")
    p.add_argument("--prompt-sizes", default="16,64,128,256,512,1024", help="prompt sweep, batch 1")
    p.add_argument("--batch-sizes", default="1,2,4,8,16", help="batch sweep at --batch-prompt")
    p.add_argument("--batch-prompt", type=int, default=128, help="prompt size of the batch sweep")
    p.add_argument("--token-size", type=int, default=8, help="tokens generated per request")
    p.add_argument("--repeats", type=int, default=3, help="runs per grid point")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.set_defaults(func=run)


def profile_engine(
    engine: Engine,
    model_name: str,
    hardware: str,
    points: Sequence[tuple[int, int]],
    token_size: int,
    repeats: int,
    progress: bool = False,
) -> list[TableRow]:
    """Time each (prompt_size, batch_size) point: the prefill step(s), then the decode steps.

    The engine's token budget should cover prompt_size x batch_size, or the prompt time spans
    several chunked steps (the table's prompt_time is read as one step's time).
    """
    from batonserve.workers.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=token_size, ignore_eos=True)
    vocab = int(engine.model_config.vocab_size)
    rows: list[TableRow] = []
    run = 0
    for prompt_size, batch in points:
        for rep in range(repeats + 1):
            warmup = rep == 0  # the first run of each point warms up and is dropped
            run += 1
            ids = [f"profile-{run}-{b}" for b in range(batch)]
            for b, rid in enumerate(ids):
                # Distinct prompts so that no request reuses another's cached prefix.
                tokens = [
                    1 + (run * 7919 + b * 104729 + i) % (vocab - 1) for i in range(prompt_size)
                ]
                engine.add_request(rid, tokens, params)
            first: set[str] = set()
            t0 = time.perf_counter()
            while len(first) < batch:
                first.update(o.request_id for o in engine.step() if o.token_ids)
            t1 = time.perf_counter()
            decode_steps = 0
            while engine.has_unfinished():
                engine.step()
                decode_steps += 1
            t2 = time.perf_counter()
            if warmup:
                continue
            token_ms = (t2 - t1) * 1e3 / decode_steps if decode_steps else 0.0
            rows.append(
                TableRow(
                    model_name,
                    hardware,
                    prompt_size,
                    batch,
                    token_size,
                    (t1 - t0) * 1e3,
                    token_ms,
                    1,
                )
            )
            if progress:
                print(
                    f"prompt {prompt_size:5d} x batch {batch:3d}: prefill {(t1 - t0) * 1e3:8.2f} ms, "
                    f"decode step {token_ms:7.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def run(args: argparse.Namespace) -> int:
    """Load the engine, sweep the grid, write the table."""
    prompts = _ints(args.prompt_sizes)
    batches = _ints(args.batch_sizes)
    if args.token_size < 2:
        raise ValueError("--token-size: must be >= 2 (decode steps are what it times)")
    if args.repeats < 1:
        raise ValueError("--repeats: must be >= 1")
    import torch

    from batonserve.workers.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    points = [(p, 1) for p in prompts] + [(args.batch_prompt, b) for b in batches if b > 1]
    biggest = max(p * b for p, b in points)
    # One step computes a whole grid point's prompts: the budget must not split them into chunks.
    engine = Engine.from_model(
        args.model,
        device=args.device,
        max_num_batched_tokens=biggest,
        max_num_seqs=max(batches),
        enable_prefix_caching=False,
    )
    name = args.model if "/" not in args.model else engine.model_dir.name
    rows = profile_engine(engine, name, args.hardware, points, args.token_size, args.repeats, True)
    write_table(args.output, rows)
    print(f"{len(rows)} rows written to {args.output}", file=sys.stderr)
    return 0

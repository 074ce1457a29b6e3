"""Where a decode step's time goes: wall time per part of `Engine.step`, by timing wrappers.

    python3 tests/bench/profile_decode.py --model-dir /tmp/bench-model --batches 1,32,128 \
        --dtype bfloat16 --threads 1 --steps 16

Builds the bench model (tests/bench/bench_engine.py) when --model-dir has none, prefills `batch`
requests, then times `--steps` decode steps with every part wrapped: the linears (oneDNN), the
attention kernel, K/V cache writes, RMSNorm, RoPE, embedding/lm-head glue, sampling, scheduling,
building the batch, the scheduler's update and output processing. "other" is the step minus the
parts: Python glue between them. The wrappers add a little time of their own (~1 us per call).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_engine import build_model, prompts_for

from batonserve.workers import engine as engine_mod
from batonserve.workers import engine_core, forward_context, model_runner
from batonserve.workers.engine import Engine
from batonserve.workers.models import layers, llama
from batonserve.workers.sampling_params import SamplingParams

TIMES: dict[str, float] = collections.defaultdict(float)


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, adding its wall time to TIMES[name] (nested parts are subtracted by the caller)."""

    def wrapper(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[name] += time.perf_counter() - t0

    return wrapper


def patch() -> None:
    """Wrap each part of the step (module attributes the step looks up at call time)."""
    for mod in (layers, llama):
        mod.linear = timed("linears", mod.linear)  # type: ignore[attr-defined]
    layers.fused_add_rms_norm = timed("norms", layers.fused_add_rms_norm)  # type: ignore[attr-defined]
    layers.rms_norm = timed("norms", layers.rms_norm)  # type: ignore[attr-defined]
    layers.apply_rope = timed("rope", layers.apply_rope)  # type: ignore[attr-defined]
    llama.rope_cos_sin = timed("rope", llama.rope_cos_sin)  # type: ignore[attr-defined]
    md = forward_context.AttentionMetadata
    md.attend = timed("attention", md.attend)  # type: ignore[method-assign]
    core = engine_core.EngineCore
    engine_core.build_forward_batch = timed("build batch", engine_core.build_forward_batch)
    sched = engine_core.Scheduler
    sched.schedule = timed("schedule", sched.schedule)  # type: ignore[method-assign]
    sched.update = timed("scheduler update", sched.update)  # type: ignore[method-assign]
    engine_core.Sampler.sample = timed("sampling", engine_core.Sampler.sample)  # type: ignore[method-assign]
    core._outputs = timed("core outputs", core._outputs)  # type: ignore[method-assign]
    proc = engine_mod.OutputProcessor
    proc.process = timed("output processing", proc.process)  # type: ignore[method-assign]
    mr = model_runner.ModelRunner
    mr.execute = timed("forward", mr.execute)  # type: ignore[method-assign]


def profile(engine: Engine, batch: int, steps: int) -> tuple[float, dict[str, float]]:
    """Median step seconds and the mean seconds per part over `steps` decode steps."""
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    engine.core.pool.reset_prefix_cache()
    for i, p in enumerate(prompts_for(batch, seed=batch)):
        engine.add_request(f"p{batch}-{i}", p, params)
    while any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.core.scheduler.requests.values()
    ):
        engine.step()  # prefill
    engine.step()
    TIMES.clear()
    per_step = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        per_step.append(time.perf_counter() - t0)
    while engine.has_unfinished():
        engine.step()
    parts = {k: v / steps for k, v in TIMES.items()}
    return statistics.median(per_step), parts


def main() -> None:
    """Print the breakdown per batch size."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--set", action="append", default=[], help="engine setting name=value")
    args = ap.parse_args()
    if not (args.model_dir / "config.json").is_file():
        build_model(args.model_dir)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    extra: dict[str, Any] = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        default = getattr(model_runner.EngineConfig(), k)
        extra[k] = v.lower() in ("1", "true") if isinstance(default, bool) else type(default)(v)
    engine = Engine.from_model(
        args.model_dir,
        dtype=args.dtype,
        device="cpu",
        max_num_seqs=max(batches),
        kv_cache_bytes=2 * 2**30,
        num_threads=args.threads,
        **extra,
    )
    patch()
    profile(engine, 2, 4)  # warm-up
    for b in batches:
        step, parts = profile(engine, b, args.steps)
        fwd = parts.pop("forward", 0.0)
        inner = sum(parts.get(k, 0.0) for k in ("linears", "norms", "rope", "attention"))
        parts["forward glue (embed, kv write, views)"] = fwd - inner
        parts["other (step glue)"] = step - sum(parts.values())
        print(
            f"\nbatch {b}, {args.dtype}, {args.threads} thread(s): step {step * 1e3:.2f} ms "
            f"({b / step:.0f} tok/s)"
        )
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {k:40s} {v * 1e3:8.3f} ms  {100 * v / step:5.1f}%")


if __name__ == "__main__":
    main()

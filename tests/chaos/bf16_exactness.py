"""Is a resumed stream exact in 16-bit precision? A measurement on the bundled demo model (CPU).

    python tests/chaos/bf16_exactness.py --dtype bfloat16 --prompts 16 --tokens 48

For seeded prompts (code-like text of varied length, greedy) it compares, per stream, the
undisturbed run alone on a fresh engine with:
- batched: the same prompts run together on one engine (the served batch differs from the
  offline one: is a served undisturbed run even equal to the offline engine?);
- resume cold: prompt + the first k tokens prefilled on a fresh engine (a resume on another
  worker with nothing cached), continued to the end;
- resume cached: the same on the engine that ran the undisturbed stream (its prompt blocks are
  cached, only the generated tokens are prefilled again: the common live case);
and prints how many streams differ and at which output position they first do.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence

from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.tokenizer import Tokenizer

WORDS = ("def", "class", "import", "return", "for", "while", "if", "self", "print", "x", "(", ")")


def prompts_for(seed: int, n: int, tok: Tokenizer) -> list[list[int]]:
    """n seeded code-like prompts of 2 to 200 words."""
    rng = random.Random(seed)
    texts = [
        " ".join(rng.choice(WORDS) for _ in range(rng.choice((2, 6, 20, 60, 200))))
        for _ in range(n)
    ]
    return [tok.encode(t) for t in texts]


def first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    """The first position where a and b differ, or -1."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return -1 if len(a) == len(b) else min(len(a), len(b))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--resume-at", type=int, nargs="+", default=[4, 16, 32])
    args = ap.parse_args(argv)
    cfg = EngineConfig(dtype=args.dtype, device="cpu", num_kv_blocks=256)  # small: many engines
    tok = Tokenizer.from_model_dir(resolve_model_dir("demo"))
    prompts = prompts_for(args.seed, args.prompts, tok)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)

    def rest(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    alone: list[list[int]] = []
    engines: list[Engine] = []
    for i, p in enumerate(prompts):
        e = Engine("demo", cfg)
        alone.append(list(e.generate([p], params)[0].token_ids))
        engines.append(e)
        print(f"prompt {i}: {len(p)} tokens", file=sys.stderr, flush=True)
    batched = [list(o.token_ids) for o in Engine("demo", cfg).generate(prompts, params)]
    rows = [("batched", [first_diff(a, b) for a, b in zip(alone, batched, strict=True)])]
    for k in args.resume_at:
        cold, cached = [], []
        for i, p in enumerate(prompts):
            ctx = p + alone[i][:k]
            got = list(Engine("demo", cfg).generate([ctx], rest(args.tokens - k))[0].token_ids)
            cold.append(first_diff(alone[i][k:], got))
            got = list(engines[i].generate([ctx], rest(args.tokens - k))[0].token_ids)
            cached.append(first_diff(alone[i][k:], got))
        rows += [(f"resume cold at {k}", [d + k if d >= 0 else -1 for d in cold])]
        rows += [(f"resume cached at {k}", [d + k if d >= 0 else -1 for d in cached])]
    print(f"{args.dtype}, {len(prompts)} prompts, {args.tokens} greedy tokens, seed {args.seed}")
    for name, diffs in rows:
        bad = [d for d in diffs if d >= 0]
        print(f"  {name}: {len(bad)} of {len(diffs)} streams differ; first positions {sorted(bad)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

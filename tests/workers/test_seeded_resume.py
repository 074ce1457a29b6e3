"""Seeded sampling is exact across a resume: prompt + tokens so far continue the same sequence."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams

PROMPT = [0, 17, 250, 91, 12, 40, 41]
N = 24


def _engine(path: Path) -> Engine:
    return Engine.from_model(path, dtype="float32", block_size=4, num_kv_blocks=64)


def test_resumed_request_draws_the_same_tokens(tiny_model: Callable[[str], Path]) -> None:
    path = tiny_model("llama")
    params = SamplingParams(max_tokens=N, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    full = _engine(path).generate([PROMPT], params)[0].token_ids
    assert len(full) == N and len(set(full)) > 3  # really sampled, not stuck on one token
    for k in (1, 9):
        # A second engine (another worker) resumes from prompt + the first k tokens, in a batch
        # with an unrelated request so the batch layout differs too.
        rest = SamplingParams(
            max_tokens=N - k, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True
        )
        other = SamplingParams(max_tokens=5, temperature=0.7, ignore_eos=True)
        outs = _engine(path).generate([[3, 4, 5], PROMPT + full[:k]], [other, rest])
        assert outs[1].token_ids == full[k:], f"resumed after {k} tokens"


def test_unseeded_requests_still_vary_with_the_engine_seed(
    tiny_model: Callable[[str], Path],
) -> None:
    path = tiny_model("llama")
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    a = Engine.from_model(path, dtype="float32", block_size=4, num_kv_blocks=64, seed=1)
    b = Engine.from_model(path, dtype="float32", block_size=4, num_kv_blocks=64, seed=2)
    assert a.generate([PROMPT], params)[0].token_ids != b.generate([PROMPT], params)[0].token_ids

"""The scripted engine samples seeded streams through the real sampler, so the chaos harness can
check seeded sampling across a resume: prompt + tokens so far continue the same sequence."""

from __future__ import annotations

from testkit.scripted_reference import scripted_reference

from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

CFG = ScriptedEngineConfig(block_size=4)
PROMPT = [5, 17, 60, 91, 12, 40, 41]
N = 24


def _params(n: int, seed: int | None = 99) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, seed=seed, ignore_eos=True)


def test_seeded_stream_is_sampled_and_exact_across_a_resume() -> None:
    full = scripted_reference(CFG, [PROMPT], _params(N))[0]
    greedy = scripted_reference(CFG, [PROMPT], SamplingParams(max_tokens=N, ignore_eos=True))[0]
    assert len(full) == N and full != greedy  # really sampled
    assert scripted_reference(CFG, [PROMPT], _params(N, seed=100))[0] != full
    for k in (1, 7, 20):
        assert scripted_reference(CFG, [PROMPT + full[:k]], _params(N - k))[0] == full[k:], k

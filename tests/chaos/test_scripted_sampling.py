"""The scripted engine samples seeded streams through the real sampler, so the chaos harness can
check seeded sampling across a resume: prompt + tokens so far continue the same sequence."""

from __future__ import annotations

import dataclasses
import time

from chaos import check_stream, reference
from testkit.scripted_reference import scripted_reference

from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scripted_engine import ScriptedEngineConfig

CFG = ScriptedEngineConfig(block_size=4)  # the chaos harness's reference uses its own config
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


def test_logprobs_one_per_token_and_exact_across_a_resume() -> None:
    """Asked for, the scripted engine gives one logprob per token (greedy and seeded alike),
    and the same ones after a resume: the chaos harness checks them against an undisturbed run."""
    for params in (
        SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logprobs=0),
        dataclasses.replace(_params(N), logprobs=2),
    ):
        toks, lps = reference(PROMPT, params)
        assert len(toks) == N and [lp.token_id for lp in lps if lp is not None] == toks
        assert all(lp is not None and len(lp.top) == params.logprobs for lp in lps)
        for k in (1, 7):
            rest = dataclasses.replace(params, max_tokens=N - k)
            assert reference(PROMPT + toks[:k], rest) == (toks[k:], lps[k:]), k
    assert reference(PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[1] == []


def test_stream_check_catches_a_repeated_first_token_and_a_missing_logprob() -> None:
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    toks, lps = reference(PROMPT, params)
    assert check_stream(0, (toks, lps), (toks, lps), params, 0) == ""
    assert check_stream(0, (toks[:3], lps[:3]), (toks, lps), params, 2) == ""  # aborted
    assert check_stream(0, ([toks[0], *toks], [lps[0], *lps]), (toks, lps), params, 0)
    assert check_stream(0, (toks, [None, *lps[1:]]), (toks, lps), params, 0)
    assert check_stream(0, (toks, lps[1:]), (toks, lps), params, 0)
    assert check_stream(0, (toks[:1], lps[:1]), (toks, lps), params, 4)  # stopped short


def test_paced_prefill_takes_time_per_prompt_token_and_changes_no_token() -> None:
    """The chaos harness paces its workers' prefill (so a prompt backlog lasts) and runs its
    reference unpaced: the pace must change no token."""
    prompt = [2 + i % 90 for i in range(120)]
    params = _params(4)
    paced = dataclasses.replace(CFG, prompt_token_delay_s=0.001)
    start = time.monotonic()
    assert scripted_reference(paced, [prompt], params) == scripted_reference(CFG, [prompt], params)
    assert time.monotonic() - start >= 0.12  # 120 prompt tokens at 1 ms (decode is not paced)

"""Engine on tiny random HF models: greedy parity with transformers, batch/chunk/cache/preemption invariance."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from testkit.hf_tiny import ARCHS, load_hf_model

from batonserve.workers.engine import LLM, Engine
from batonserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
# Prompts of different lengths (token ids; the tiny vocab is 384), crossing block boundaries.
PROMPTS = [
    [0, 17, 250, 91],
    [0, *range(100, 123)],
    [
        0,
        44,
        45,
        46,
        300,
        301,
        5,
        6,
        7,
        8,
        9,
        10,
        11,
        300,
        200,
        100,
        50,
        25,
        12,
        6,
        3,
        70,
        71,
        72,
        73,
        74,
        75,
        76,
        77,
        78,
        79,
        80,
        81,
        82,
        83,
        84,
        85,
        86,
        87,
        88,
        89,
        90,
        91,
        92,
        93,
        94,
        95,
    ],
]
Models = Callable[[str], Path]


def _engine(path: Path, **kw: object) -> Engine:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("dtype", "float32")  # parity with transformers' float32 ("auto" may be bf16)
    return Engine.from_model(path, **kw)  # type: ignore[arg-type]


def _hf_greedy(model: object, prompt: list[int], n: int) -> list[int]:
    out = model.generate(  # type: ignore[attr-defined]
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=2
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf_generate(arch: str, tiny_model: Models) -> None:
    path = tiny_model(arch)
    hf = load_hf_model(path)
    outs = _engine(path).generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert out.token_ids == _hf_greedy(hf, prompt, 32), f"{arch}, prompt of {len(prompt)}"
        assert out.finish_reason == "length" and out.completion_tokens == 32
        assert out.prompt_tokens == len(prompt)


def test_batch_invariance_greedy_and_seeded(tiny_model: Models) -> None:
    path = tiny_model("llama")
    eng = _engine(path)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    alone_g = eng.generate([PROMPTS[1]], GREEDY)[0].token_ids
    alone_s = eng.generate([PROMPTS[1]], seeded)[0].token_ids
    mixed = [PROMPTS[2], PROMPTS[1], PROMPTS[0], PROMPTS[1], [0, 9]]
    params = [GREEDY, GREEDY, seeded, seeded, SamplingParams(max_tokens=5, temperature=1.0)]
    outs = _engine(path, enable_prefix_caching=False).generate(mixed, params)
    assert outs[1].token_ids == alone_g
    assert outs[3].token_ids == alone_s
    assert len(set(alone_s)) > 3  # really sampled, not collapsed to greedy


def test_chunked_prefill_equals_unchunked(tiny_model: Models) -> None:
    path = tiny_model("qwen2")
    whole = _engine(path).generate(PROMPTS, GREEDY)
    eng = _engine(path, max_num_batched_tokens=5)
    chunked = eng.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]


def test_prefix_cache_hit_equals_cold_run(tiny_model: Models) -> None:
    path = tiny_model("llama")
    base = PROMPTS[2]
    variant = [*base[:40], 7, 8, 9]  # shares 40 tokens = 10 full blocks
    cold = _engine(path, enable_prefix_caching=False).generate([variant], GREEDY)[0]
    eng = _engine(path)
    eng.generate([base], GREEDY)
    warm = eng.generate([variant], GREEDY)[0]
    assert warm.token_ids == cold.token_ids
    assert cold.cached_tokens == 0 and warm.cached_tokens == 40
    again = eng.generate([variant], GREEDY)[0]  # the whole prompt but its last token is cached
    assert again.token_ids == cold.token_ids and again.cached_tokens == 40
    st = eng.stats()
    assert st.prefix_hits >= 80 and st.prefix_queries >= st.prefix_hits


def test_preempted_request_equals_undisturbed(tiny_model: Models) -> None:
    path = tiny_model("mistral")
    prompts = [PROMPTS[1], PROMPTS[0], [0, *range(200, 215)]]
    ref = _engine(path).generate(prompts, GREEDY)
    # 3 requests of up to 24 + 32 tokens need ~14 blocks each: 20 blocks force preemption.
    eng = _engine(path, num_kv_blocks=20)
    outs = eng.generate(prompts, GREEDY)
    assert eng.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert eng.core.pool.usage == 0.0


def test_step_interface_streams_text_and_llm_alias(tiny_model: Models) -> None:
    path = tiny_model("llama")
    eng = LLM.from_model(path, block_size=4, num_kv_blocks=64)
    eng.add_request(
        "a", "def main():", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    eng.add_request("b", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    ids: dict[str, list[int]] = {"a": [], "b": []}
    text = ""
    finished = []
    for _ in range(50):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            ids[out.request_id] += out.token_ids
            text += out.text if out.request_id == "a" else ""
            if out.finished:
                finished.append((out.request_id, out.finish_reason, out.completion_tokens))
    assert sorted(finished) == [("a", "length", 12), ("b", "length", 3)]
    assert eng.tokenizer is not None
    assert text == eng.tokenizer.decode(ids["a"])
    full = eng.generate(
        "def main():", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    )
    assert full[0].token_ids == ids["a"]


def test_eos_stop_ids_stop_strings_and_max_model_len(tiny_model: Models, tmp_path: Path) -> None:
    path = tiny_model("llama")
    eng = _engine(path, max_model_len=30)
    free = eng.generate([PROMPTS[0]], GREEDY)[0]
    assert len(free.token_ids) == 26 and free.finish_reason == "length"  # context of 30
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    out = eng.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=[stop_tok])
    )[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    # A stop string made of generated text: cut before it, even across token boundaries.
    stop = free.text[3:7]
    cut = free.text.index(stop)
    out = eng.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert out.finish_reason == "stop" and out.text == free.text[:cut]
    # EOS from generation_config.json ends a request unless ignore_eos.
    eos_dir = tmp_path / "eos"
    shutil.copytree(path, eos_dir)
    gen = json.loads((eos_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [stop_tok]
    (eos_dir / "generation_config.json").write_text(json.dumps(gen))
    eos_eng = _engine(eos_dir)
    assert eos_eng.eos_token_ids == (stop_tok,)
    out = eos_eng.generate([PROMPTS[0]], SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    out = eos_eng.generate(
        [PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    )[0]
    assert out.token_ids == free.token_ids[:20] and out.finish_reason == "length"
    lp = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0.0, logprobs=2))[
        0
    ].logprobs
    assert len(lp) == 2 and lp[0] is not None and lp[0].top[0][0] == lp[0].token_id


def test_bad_inputs_raise_naming_the_field(tiny_model: Models, tmp_path: Path) -> None:
    path = tiny_model("llama")
    eng = _engine(path, max_model_len=16)
    cases = {
        "prompt": [
            lambda: eng.generate([""]),
            lambda: eng.add_request("x", []),
            lambda: eng.add_request("x", list(range(16))),
        ],
        "temperature": [lambda: SamplingParams(temperature=-0.1)],
        "top_p": [lambda: SamplingParams(top_p=0.0), lambda: SamplingParams(top_p=1.5)],
        "max_tokens": [lambda: SamplingParams(max_tokens=0)],
        "model": [lambda: Engine.from_model(tmp_path / "nope")],
        "max_model_len": [lambda: Engine.from_model(path, max_model_len=10**6)],
    }
    for field, calls in cases.items():
        for call in calls:
            with pytest.raises(ValueError, match=field):
                call()
    eng.add_request("dup", [0, 1, 2])
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("dup", [0, 1, 2])
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("y", [0, 99999])
    with pytest.raises(ValueError, match="bogus"):
        Engine.from_model(path, bogus=1)
    eng.abort_request("dup")
    assert not eng.has_unfinished() and eng.core.pool.usage == 0.0

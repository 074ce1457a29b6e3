"""KV bytes per token (GQA-correct), transfer time, KV capacity, and trace loading."""

from __future__ import annotations

import itertools
import statistics

import pytest

from batonserve.cluster.sim.hardware import (
    DEFAULT_MACHINES,
    DEFAULT_MODELS,
    MachineSpec,
    kv_capacity_tokens,
    model_spec_from_hf,
    transfer_seconds,
)
from batonserve.cluster.sim.trace import (
    LengthDist,
    _parse_time,
    load_azure_trace,
    retime_poisson,
    sample_lengths,
    synthetic_trace,
)
from batonserve.workers.models.paths import resolve_model_dir


def test_kv_bytes_per_token_counts_kv_heads_not_query_heads() -> None:
    llama = DEFAULT_MODELS["llama2-70b"]  # 64 query heads share 8 KV heads
    assert llama.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680
    bloom = DEFAULT_MODELS["bloom-176b"]
    assert bloom.kv_bytes_per_token == 2 * 70 * 112 * 128 * 2
    demo = model_spec_from_hf(resolve_model_dir("demo"))
    import json

    cfg = json.loads((resolve_model_dir("demo") / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert demo.kv_bytes_per_token == 2 * cfg["num_hidden_layers"] * heads * head_dim * 2


def test_transfer_time_uses_the_slower_link() -> None:
    llama = DEFAULT_MODELS["llama2-70b"]
    a, h = DEFAULT_MACHINES["a100-80gb"], DEFAULT_MACHINES["h100-80gb"]
    # 1000 tokens x 327,680 B over 200 GB/s (the A100 side).
    assert transfer_seconds(1000, llama, h, a) == pytest.approx(327_680_000 / 200e9)
    assert transfer_seconds(1000, llama, h, h) == pytest.approx(327_680_000 / 400e9)


def test_kv_capacity_after_weights() -> None:
    llama = DEFAULT_MODELS["llama2-70b"]
    a = DEFAULT_MACHINES["a100-80gb"]
    assert kv_capacity_tokens(a, llama) == int((640e9 - 140e9) * 0.9 // 327_680)
    assert kv_capacity_tokens(MachineSpec("x", 1, 1, kv_capacity_tokens=123), llama) == 123
    with pytest.raises(ValueError, match="does not fit"):
        kv_capacity_tokens(MachineSpec("tiny", 1, 1, num_gpus=1, gpu_memory_gb=10), llama)


def test_code_trace_loads_in_order_with_its_timestamps() -> None:
    assert _parse_time("2023-11-16 18:17:03.9799600").microsecond == 979960
    t = load_azure_trace("code")
    assert len(t) == 8819
    assert t[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(t))
    assert 3400 < t[-1].arrival_s < 3600  # one hour of traffic
    assert min(r.prompt_tokens for r in t) >= 1 and min(r.output_tokens for r in t) >= 1
    assert len(load_azure_trace("code", limit=10)) == 10
    with pytest.raises(ValueError, match="no such file"):
        load_azure_trace("/nonexistent.csv")


def test_conversation_trace_is_bundled() -> None:
    t = load_azure_trace("conv")
    assert len(t) == 19366
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(t))
    # Conversation: shorter prompts, longer answers than code (means 1155 and 211 tokens).
    assert 1100 < sum(r.prompt_tokens for r in t) / len(t) < 1200
    assert 200 < sum(r.output_tokens for r in t) / len(t) < 220


def test_poisson_retiming_and_synthetic_traces() -> None:
    base = load_azure_trace("code", limit=4000)
    r = retime_poisson(base, rate=20.0, seed=1)
    assert [x.prompt_tokens for x in r] == [x.prompt_tokens for x in base]
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(r)]
    assert statistics.mean(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    s = synthetic_trace(
        2000, 5.0, LengthDist("uniform", low=10, high=20), LengthDist("constant", 7), "uniform"
    )
    assert all(10 <= x.prompt_tokens <= 20 and x.output_tokens == 7 for x in s)
    assert s[1].arrival_s - s[0].arrival_s == pytest.approx(0.2)
    e = synthetic_trace(
        4000, 5.0, LengthDist("exponential", 300), LengthDist("lognormal", 50, sigma=0.5)
    )
    assert statistics.mean(x.prompt_tokens for x in e) == pytest.approx(300, rel=0.06)
    assert statistics.median(x.output_tokens for x in e) == pytest.approx(50, rel=0.06)


def test_sampled_lengths_draw_prompts_and_outputs_independently() -> None:
    base = load_azure_trace("code", limit=500)
    s = sample_lengths(base, 3000, seed=2)
    assert len(s) == 3000 and len({x.request_id for x in s}) == 3000
    prompts, outputs = {x.prompt_tokens for x in base}, {x.output_tokens for x in base}
    assert all(x.prompt_tokens in prompts and x.output_tokens in outputs for x in s)
    pairs = {(x.prompt_tokens, x.output_tokens) for x in base}
    assert sum((x.prompt_tokens, x.output_tokens) not in pairs for x in s) > 1000  # not rows
    assert statistics.mean(x.prompt_tokens for x in s) == pytest.approx(
        statistics.mean(x.prompt_tokens for x in base), rel=0.08
    )
    assert sample_lengths(base, 50, seed=2) == s[:50]
    with pytest.raises(ValueError, match="sample_lengths"):
        sample_lengths([], 5)

"""The bundled demo models: files, transformers loading, routing statistics, batonserve parity."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from batonserve.workers.engine import Engine
from batonserve.workers.model_runner import cpu_has_native_bf16
from batonserve.workers.models.bundled.demo_export import RoutingStats, hf_router_logits
from batonserve.workers.models.bundled.demo_export import routing_stats as stats_of
from batonserve.workers.models.layers import SparseMoE
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.sampling_params import SamplingParams

NAMES = ("demo", "demo-moe")
MAX_BYTES = 20 * 1000 * 1000  # both models' weights together
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
PROMPT_TEXTS = (
    "import os\nimport sys\n\n\ndef main(",
    "class Cache:\n    def get(self, key",
    "for",
)
# Fixed text for the routing statistics: Python the model never saw (written for this test).
ROUTING_TEXT = '''"""Small helpers for reading settings files."""

import os
from dataclasses import dataclass


@dataclass
class Setting:
    name: str
    value: str


def read_settings(path):
    """Return the settings in `path`, one `name = value` per line."""
    result = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, value = line.partition("=")
            result.append(Setting(name.strip(), value.strip()))
    return result


class Registry:
    def __init__(self):
        self._items = {}

    def register(self, name, item):
        if name in self._items:
            raise KeyError("already registered: %r" % (name,))
        self._items[name] = item

    def get(self, name, default=None):
        return self._items.get(name, default)
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these models are tiny, and extra threads only spin on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _hf(name: str) -> Any:
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok() -> Any:
    """The shared tokenizer, through transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir("demo"))


@pytest.fixture(scope="module")
def hf_models() -> dict[str, Any]:
    """Both bundled models loaded by transformers in float32."""
    return {name: _hf(name) for name in NAMES}


def test_bundled_dirs_complete_fp16_and_small() -> None:
    total = 0
    for name in NAMES:
        d = resolve_model_dir(name)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{name}/{f}"
        cfg = json.loads((d / "config.json").read_text())
        gen = json.loads((d / "generation_config.json").read_text())
        assert cfg["dtype"] == cfg["torch_dtype"] == "float16"
        assert gen["eos_token_id"] == cfg["eos_token_id"] == 0
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
        total += (d / "model.safetensors").stat().st_size
    assert (resolve_model_dir("demo") / "tokenizer.json").read_bytes() == (
        resolve_model_dir("demo-moe") / "tokenizer.json"
    ).read_bytes()
    assert total <= MAX_BYTES


def _keys(name: str) -> dict[str, tuple[int, ...]]:
    with safe_open(str(resolve_model_dir(name) / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def test_checkpoints_use_canonical_names() -> None:
    dense = _keys("demo")
    assert dense["model.layers.0.self_attn.q_proj.weight"] == (256, 256)
    assert dense["model.layers.0.self_attn.k_proj.weight"] == (64, 256)  # GQA: 2 KV heads of 32
    assert dense["model.layers.3.mlp.gate_proj.weight"] == (512, 256)
    assert "lm_head.weight" not in dense  # tied to the embedding
    moe = _keys("demo-moe")
    assert not [k for k in moe if ".mlp." in k]  # no transformers-5 fused expert layout
    for layer in range(4):
        p = f"model.layers.{layer}.block_sparse_moe."
        assert moe[p + "gate.weight"] == (16, 256)
        for e in range(16):
            assert moe[f"{p}experts.{e}.w1.weight"] == (64, 256)
            assert moe[f"{p}experts.{e}.w3.weight"] == (64, 256)
            assert moe[f"{p}experts.{e}.w2.weight"] == (256, 64)


def test_config_is_standard() -> None:
    dense = json.loads((resolve_model_dir("demo") / "config.json").read_text())
    moe = json.loads((resolve_model_dir("demo-moe") / "config.json").read_text())
    assert dense["architectures"] == ["LlamaForCausalLM"] and dense["model_type"] == "llama"
    assert moe["architectures"] == ["MixtralForCausalLM"] and moe["model_type"] == "mixtral"
    assert (moe["num_local_experts"], moe["num_experts_per_tok"]) == (16, 2)
    for cfg in (dense, moe):
        assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 2)
        assert cfg["head_dim"] == 32 and cfg["rope_theta"] == 10000.0


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_trained_weights(name: str, tok: Any, hf_models: dict[str, Any]) -> None:
    ids = tok(ROUTING_TEXT, return_tensors="pt").input_ids  # [1, T], starts with bos
    assert ids[0, 0] == 0 and tok.decode(ids[0], skip_special_tokens=True) == ROUTING_TEXT
    with torch.no_grad():
        loss = float(hf_models[name](input_ids=ids, labels=ids).loss)
    # random weights give ~ln(4096) = 8.3 nats/token; trained ones predict unseen Python well
    assert loss < 4.5, loss


def _routing(model: Any, tok: Any) -> RoutingStats:
    ids = tok(ROUTING_TEXT, return_tensors="pt").input_ids[0]
    return stats_of(hf_router_logits(model, ids), top_k=2)


def test_moe_routing_reproducible_and_nonuniform(tok: Any, hf_models: dict[str, Any]) -> None:
    a = _routing(hf_models["demo-moe"], tok)
    b = _routing(_hf("demo-moe"), tok)  # a fresh load gives the very same numbers
    assert a == b
    assert a.num_experts == 16 and len(a.load) == 4 and a.num_tokens > 200
    for layer, (load, ent) in enumerate(zip(a.load, a.entropy, strict=True)):
        assert math.isclose(sum(load), 1.0)
        assert ent < 0.6 * a.uniform_entropy, (
            f"layer {layer}: entropy {ent:.3f} too close to uniform"
        )
        # no collapse: top-2 load can reach 0.5 (one expert in every token's pair)
        assert sum(x > 0.01 for x in load) >= 8, f"layer {layer}: fewer than 8 experts used"
    assert sum(a.entropy) / 4 < 0.5 * a.uniform_entropy


def test_batonserve_loads_both_with_the_cpu_auto_dtype() -> None:
    # "auto" on CPU: bf16 where the CPU multiplies bf16 natively, else fp32 (not the fp16 on disk).
    auto = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    for name in NAMES:
        eng = Engine.from_model(name, num_kv_blocks=64)
        assert eng.runner.dtype == auto
        out = eng.generate("def ", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        assert out[0].completion_tokens == 8 and out[0].text


@pytest.mark.parametrize("name", NAMES)
def test_batonserve_greedy_matches_transformers(
    name: str, tok: Any, hf_models: dict[str, Any]
) -> None:
    prompts = [tok(t).input_ids for t in PROMPT_TEXTS]
    outs = Engine.from_model(name, dtype="float32", num_kv_blocks=64).generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        ref = (
            hf_models[name]
            .generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None
            )[0, len(prompt) :]
            .tolist()
        )
        assert out.token_ids == ref, f"{name}: {tok.decode(prompt)!r}"


def test_routing_through_batonserve_matches_transformers(
    tok: Any, hf_models: dict[str, Any]
) -> None:
    eng = Engine.from_model("demo-moe", dtype="float32", num_kv_blocks=64)
    moes = [m for m in eng.runner.model.modules() if isinstance(m, SparseMoE)]
    assert len(moes) == 4
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(moes))}

    def hook(layer: int) -> Any:
        def fn(mod: SparseMoE, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            captured[layer].append(F.linear(inp[0], mod.gate).float())  # [T, E] router logits

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(moes)]
    try:  # one generated token: only the prefill runs, over every prompt token
        eng.generate(tok(ROUTING_TEXT).input_ids, SamplingParams(max_tokens=1, temperature=0.0))
    finally:
        for h in handles:
            h.remove()
    ours = stats_of([torch.cat(captured[i]) for i in range(len(moes))], top_k=2)
    ref = _routing(hf_models["demo-moe"], tok)
    assert ours.num_tokens == ref.num_tokens
    for la, lb in zip(ours.load, ref.load, strict=True):
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) <= 2 / ref.num_tokens
    assert max(abs(x - y) for x, y in zip(ours.entropy, ref.entropy, strict=True)) < 1e-3

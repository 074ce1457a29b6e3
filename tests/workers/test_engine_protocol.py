"""The worker-engine seam: the real engine core and the scripted fake are both `WorkerEngine`s and
behave alike through it (the worker's own typing is checked by mypy in tests/test_lint.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import build_core
from batonserve.workers.engine_protocol import WorkerEngine
from batonserve.workers.sampling_params import SamplingParams
from batonserve.workers.scheduler import StepPlan
from batonserve.workers.scripted_engine import ScriptedEngine, ScriptedEngineConfig

PROMPT = [0, *range(30, 43)]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _engines(kind: str, tiny_model: Callable[[str], Path]) -> list[WorkerEngine]:
    if kind == "scripted":
        return [ScriptedEngine(ScriptedEngineConfig(block_size=4)) for _ in range(3)]
    cfg = EngineConfig(block_size=4, num_kv_blocks=64)
    return [build_core(tiny_model("llama"), cfg, model_name="tiny") for _ in range(3)]


def _run(engine: WorkerEngine, rid: str) -> list[int]:
    tokens: list[int] = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.new_token_ids
    return tokens


@pytest.mark.parametrize("kind", ["scripted", "real"])
def test_both_engines_hand_a_request_over_through_the_protocol(
    kind: str, tiny_model: Callable[[str], Path]
) -> None:
    ref, a, b = _engines(kind, tiny_model)
    assert all(isinstance(e, WorkerEngine) for e in (ref, a, b))
    assert a.kv_spec == b.kv_spec
    ref.add_request("r", PROMPT, PARAMS)
    expected = _run(ref, "r")
    assert len(expected) == PARAMS.max_tokens

    # Prefill only on a: the layer hook sees every layer of the step, with the step's plan.
    a.add_request("r", PROMPT, PARAMS, prefill_only=True)
    seen: list[tuple[int, StepPlan]] = []
    outs = a.step(lambda layer, plan: seen.append((layer, plan)))
    assert [layer for layer, _ in seen] == list(range(a.kv_spec.num_layers))
    assert all(p.seqs[0].request_id == "r" for _, p in seen)
    (out,) = outs
    assert out.prefilled and not out.finished and len(out.new_token_ids) == 1
    first = out.new_token_ids[0]
    assert not a.has_unfinished() and a.stats().num_pinned == 1

    # The same slot type on both sides; KV copied layer by layer, then decode on b.
    src = a.kv_slots("r")
    assert src.dtype == torch.int64 and src.shape == (len(PROMPT),)
    dst = b.import_request("r", PROMPT, first, PARAMS)
    assert dst.dtype == torch.int64 and dst.shape == (len(PROMPT),)
    for layer in range(a.kv_spec.num_layers):
        k, v = a.read_kv(layer, src)
        b.write_kv(layer, dst, k, v)
    b.commit_import("r")
    assert a.release("r") and a.stats().num_pinned == 0
    assert [first, *_run(b, "r")] == expected

    # Abort is idempotent and frees the blocks.
    b.add_request("x", PROMPT, PARAMS)
    b.step()
    assert b.abort_request("x") and not b.abort_request("x")
    assert not b.has_unfinished()


def test_the_real_core_checks_requests_with_clear_errors(
    tiny_model: Callable[[str], Path],
) -> None:
    core = build_core(tiny_model("llama"), EngineConfig(block_size=4, num_kv_blocks=64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        core.add_request("r", [10**9], PARAMS)
    with pytest.raises(ValueError, match="must not be empty"):
        core.add_request("r", [], PARAMS)
    core.add_request("r", PROMPT, PARAMS)
    with pytest.raises(ValueError, match="already in use"):
        core.add_request("r", PROMPT, PARAMS)
    with pytest.raises(ValueError, match="first token id"):
        core.import_request("y", PROMPT, -1, PARAMS)

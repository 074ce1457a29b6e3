"""KV handoff hooks: prefill on engine A, copy every layer's KV to engine B, decode on B."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams

PROMPTS = [[0, *range(30, 53)], [0, 5, 6, 7, 8, 9]]


def _engine(path: Path, **kw: object) -> Engine:
    return Engine.from_model(path, block_size=4, num_kv_blocks=64, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("seeded", [False, True])
def test_prefill_on_a_decode_on_b_equals_one_engine(
    arch: str, seeded: bool, tiny_model: Callable[[str], Path]
) -> None:
    path = tiny_model(arch)
    params = (
        SamplingParams(max_tokens=16, temperature=0.8, seed=11, ignore_eos=True)
        if seeded
        else SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    )
    ref = _engine(path).generate(PROMPTS, params)
    a = _engine(path, max_num_batched_tokens=8)  # chunked prefill on A as well
    b = _engine(path)
    num_layers = a.model_config.num_layers
    seen: list[tuple[int, tuple[str, ...]]] = []
    for i, prompt in enumerate(PROMPTS):
        a.add_request(f"r{i}", prompt, params, prefill_only=True)
    first: dict[str, int] = {}
    for _ in range(20):
        if not a.has_unfinished():
            break
        for out in a.step(
            layer_hook=lambda layer, plan: seen.append(
                (layer, tuple(s.request_id for s in plan.seqs))
            )
        ):
            assert out.prefilled and not out.finished and len(out.token_ids) == 1
            first[out.request_id] = out.token_ids[0]
    assert sorted(first) == ["r0", "r1"]
    # The hook saw every layer of every step, in order, with the step's requests.
    assert [layer for layer, _ in seen] == list(range(num_layers)) * (len(seen) // num_layers)
    assert {rid for _, ids in seen for rid in ids} == {"r0", "r1"}
    assert a.stats().num_pinned == 2 and a.core.pool.usage > 0
    # Hand each request's KV over layer by layer.
    dst = {
        f"r{i}": b.import_request(f"r{i}", p, first[f"r{i}"], params) for i, p in enumerate(PROMPTS)
    }
    assert not b.has_unfinished() and b.stats().num_pinned == 2  # importing: not scheduled
    for i, prompt in enumerate(PROMPTS):
        rid = f"r{i}"
        src = a.kv_slots(rid)
        assert src.shape == dst[rid].shape == (len(prompt),)
        for layer in range(num_layers):
            k, v = a.runner.read_kv(layer, src)  # type: ignore[attr-defined]
            b.runner.write_kv(layer, dst[rid], k, v)  # type: ignore[attr-defined]
        b.commit_import(rid)
        a.release(rid)
    assert a.core.pool.usage == 0.0 and a.stats().num_pinned == 0
    rest: dict[str, list[int]] = {"r0": [], "r1": []}
    for _ in range(40):
        if not b.has_unfinished():
            break
        for out in b.step():
            rest[out.request_id] += out.token_ids
    for i, r in enumerate(ref):
        rid = f"r{i}"
        assert [first[rid], *rest[rid]] == r.token_ids
    assert b.core.pool.usage == 0.0


def test_handoff_errors(tiny_model: Callable[[str], Path]) -> None:
    path = tiny_model("llama")
    a = _engine(path)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    a.add_request("x", [0, 1, 2, 3, 4], params)
    with pytest.raises(ValueError, match="request_id"):
        a.kv_slots("x")  # not prefilled yet
    with pytest.raises(ValueError, match="request_id"):
        a.commit_import("x")
    with pytest.raises(ValueError, match="request_id"):
        a.import_request("x", [0, 1], 3, params)
    a.release("never-there")  # idempotent
    a.abort_request("x")
    assert a.core.pool.usage == 0.0

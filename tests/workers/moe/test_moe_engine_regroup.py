"""The engine regroups demo-moe's decode tokens by forecast experts: same tokens, fewer experts."""

from __future__ import annotations

import statistics

import pytest
import torch

from batonserve.workers.engine import Engine
from batonserve.workers.expert_store import attach_resident
from batonserve.workers.expert_store.workload import corpus_chunks
from batonserve.workers.regroup import RegroupConfig
from batonserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
BATCH, WAIT = 4, 8


def serve(
    prompts: list[list[int]], regroup: RegroupConfig | None
) -> tuple[list[list[int]], float, Engine]:
    """Greedy tokens and the mean distinct experts per MoE layer over the decode-only forwards."""
    on = regroup is not None
    engine = Engine.from_model(
        "demo-moe",
        device="cpu",
        dtype="float32",  # bf16 GEMMs round differently by batch size (cpu_gemm, gemv)
        num_kv_blocks=128,
        moe_regroup_batch=BATCH if on else 0,
        moe_regroup_max_wait=WAIT,
    )
    if regroup is not None:
        engine.core.scheduler.regroup = regroup  # the oldest-first baseline at the same cap
    ctl = attach_resident(engine.runner.model)  # records each forward's routing
    tokens = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    # Forward 0 prefills every prompt (all fit the token budget); the rest decode.
    decode = ctl.records[1:]
    assert all(int(rec.ids[0].shape[0]) <= len(prompts) for rec in decode)
    distinct = statistics.mean(int(torch.unique(ids).numel()) for r in decode for ids in r.ids)
    return tokens, distinct, engine


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """16 held-out corpus chunks of 24 tokens (real text: trained routing, not random ids)."""
    return corpus_chunks(Engine.from_model("demo-moe", device="cpu").model_dir, "heldout", 16, 24)


def test_regrouping_keeps_tokens_and_cuts_distinct_experts(prompts: list[list[int]]) -> None:
    """Outputs equal the unregrouped engine's; regrouped batches use fewer experts than FIFO ones."""
    plain, _, _ = serve(prompts, None)
    grouped, distinct, engine = serve(prompts, RegroupConfig(BATCH, WAIT))
    fifo, fifo_distinct, _ = serve(prompts, RegroupConfig(BATCH, WAIT, by_experts=False))
    assert grouped == plain and fifo == plain
    assert distinct < 0.85 * fifo_distinct  # measured: 3.57 vs 4.94 (-28%)
    st = engine.stats()
    assert 0 < st.regroup_max_wait <= WAIT
    assert st.regroup_deferred > 0
    waits = engine.core.scheduler.regroup_waits
    assert sum(waits.values()) == 16 * 23  # each decode token once (the first is prefill's)


def test_regrouping_with_the_tiered_store_keeps_tokens(prompts: list[list[int]]) -> None:
    """Regrouping over experts served from the store (LRU, a quarter resident): same tokens."""
    plain, _, _ = serve(prompts[:8], None)
    engine = Engine.from_model(
        "demo-moe",
        device="cpu",
        dtype="float32",  # bf16 GEMMs round differently by batch size (cpu_gemm, gemv)
        num_kv_blocks=128,
        moe_regroup_batch=2,
        expert_cache_policy="lru",
        expert_cache_fraction=0.25,
    )
    try:
        assert [o.token_ids for o in engine.generate(prompts[:8], GREEDY)] == plain
        st = engine.stats()
        assert (
            st.regroup_deferred > 0 and st.moe is not None and st.moe.forwards > GREEDY.max_tokens
        )
    finally:
        engine.runner.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        ("demo", {"moe_regroup_batch": 4}, "moe_regroup_batch: 4 is set but model 'demo'"),
        ("demo-moe", {"moe_regroup_batch": -1}, "moe_regroup_batch: must be >= 0"),
        ("demo-moe", {"moe_regroup_max_wait": -2}, "moe_regroup_max_wait: must be >= 0"),
    ],
)
def test_bad_regroup_settings_name_the_field(
    model: str, overrides: dict[str, int], message: str
) -> None:
    """Regrouping on a dense model, or negative values, fail with the field named."""
    with pytest.raises(ValueError, match=message):
        Engine.from_model(model, device="cpu", num_kv_blocks=16, **overrides)  # type: ignore[arg-type]

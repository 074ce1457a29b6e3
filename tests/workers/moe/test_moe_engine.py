"""The engine serves demo-moe from the tiered expert store when EngineConfig names a policy."""

from __future__ import annotations

import time

import pytest

from batonserve.workers.config import EXPERT_CACHE_POLICIES, EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.expert_store import POLICIES
from batonserve.workers.sampling_params import SamplingParams

PROMPTS = ("The cat sat on", "Once upon a time", [0, 2222, 333, 44, 555])
GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
SMALL = {"device": "cpu", "num_kv_blocks": 32}


def _tokens(engine: Engine) -> list[list[int]]:
    return [o.token_ids for o in engine.generate(list(PROMPTS), GREEDY)]


@pytest.fixture(scope="module")
def resident_tokens() -> list[list[int]]:
    """Greedy tokens of the all-resident engine."""
    engine = Engine.from_model("demo-moe", **SMALL)
    assert engine.stats().moe is None  # no store, no MoE stats
    return _tokens(engine)


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("policy", EXPERT_CACHE_POLICIES)
def test_store_engine_matches_resident(
    resident_tokens: list[list[int]], policy: str, prefetch: bool
) -> None:
    """Every online policy, with and without prefetch, decodes exactly like all-resident."""
    engine = Engine.from_model(
        "demo-moe",
        **SMALL,
        expert_cache_policy=policy,
        expert_cache_fraction=0.25,
        expert_prefetch=prefetch,
    )
    runner = engine.runner
    try:
        assert _tokens(engine) == resident_tokens
        st = engine.stats().moe
        assert st is not None
        hits = sum(map(sum, st.expert_hits))
        misses = sum(map(sum, st.expert_misses))
        assert hits > 0 and misses > 0  # a quarter of the experts: some of each
        assert hits + misses == st.demand_accesses
        assert st.tiers["ram"].hits == hits and st.tiers["ram"].misses == misses
        # Disk reads: every demand miss, plus the prefetches.
        assert st.tiers["disk"].hits >= misses
        if not prefetch:
            assert st.tiers["disk"].hits == misses and st.prefetch_issued == 0
        mc = engine.model_config
        # Every token is routed to top-k experts in every MoE layer.
        assert sum(map(sum, st.expert_load)) == st.tokens * mc.num_experts_per_tok * mc.num_layers
        total = 4 * 16 * 3 * 256 * 64 * 2  # layers x experts x (w1, w3, w2 [64, 256] fp16)
        assert 0 < st.peak_resident_bytes <= total // 4
        # Prefetch runs when asked for (the predictor of demo-moe is committed); how much it
        # loads depends on thread timing, so only its presence is checked here.
        assert (runner.expert_store.prefetcher is not None) == prefetch  # type: ignore[attr-defined]
    finally:
        runner.close()  # type: ignore[attr-defined]


def test_policy_names_cover_the_registry() -> None:
    """Every engine-selectable policy is registered; only the offline Belady is left out."""
    assert set(EXPERT_CACHE_POLICIES) <= set(POLICIES)
    assert set(POLICIES) - set(EXPERT_CACHE_POLICIES) == {"belady"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"expert_cache_policy": "belady"}, "expert_cache_policy: unknown policy 'belady'"),
        ({"expert_cache_policy": "fifo"}, "'lru', 'popularity', 'predictive'"),
        ({"expert_cache_fraction": 0.0}, "expert_cache_fraction: must be in (0, 1]"),
        ({"expert_cache_fraction": 1.5}, "expert_cache_fraction: must be in (0, 1]"),
    ],
)
def test_bad_config_values(overrides: dict[str, object], message: str) -> None:
    """Bad values fail when the config is built, naming the field."""
    with pytest.raises(ValueError) as err:
        EngineConfig(**overrides)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_policy_on_dense_model_is_an_error() -> None:
    """A policy set for a model without MoE layers names the field."""
    with pytest.raises(ValueError, match="expert_cache_policy: 'lru' is set but model 'demo'"):
        Engine.from_model("demo", **SMALL, expert_cache_policy="lru")


def test_worker_stats_carry_moe_totals_to_metrics() -> None:
    """A worker serving demo-moe from the store reports its totals; Metrics exports them."""
    from batonserve.cluster.metrics import Metrics
    from batonserve.workers.worker import Worker
    from batonserve.workers.worker_types import WorkerSpec

    engine = EngineConfig(device="cpu", num_kv_blocks=32, expert_cache_policy="lru")
    w = Worker(WorkerSpec("decode-0", "decode", "mixed", "demo-moe", engine=engine))
    try:
        w.submit("r0", [0, 17, 301, 42, 9], GREEDY)
        finished = False
        deadline = time.monotonic() + 30.0
        while not finished and time.monotonic() < deadline:
            result = w.poll(1.0)
            finished = any(d.finished for d in result.deltas)
        assert finished
        moe = w.poll(0.0).stats.moe
    finally:
        w.shutdown()
        w.engine.runner.close()
    assert moe is not None and moe.demand_accesses > 0
    m = Metrics("demo-moe", ray_mirror=False)
    m.moe("decode-0", "decode", moe)
    text = m.exposition().decode()
    hits = moe.tiers["ram"].hits
    line = 'batonserve_moe_expert_cache_hits_total{pool="decode",tier="ram",worker="decode-0"}'
    assert f"{line} {float(hits)}" in text

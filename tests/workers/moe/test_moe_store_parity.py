"""Experts served by the tiered store give bitwise the all-resident logits, whatever the policy."""

from __future__ import annotations

import pytest
from moe_helpers import PROMPTS, ResidentRun, same_logits, store_run

from batonserve.workers.expert_store import StoreConfig
from batonserve.workers.expert_store.policies import POLICIES

EXPERT_BYTES = 3 * 256 * 64 * 2  # demo-moe: w1, w3, w2 of [64, 256] in fp16
TOTAL = 64 * EXPERT_BYTES  # 4 layers x 16 experts


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize(
    ("budget", "prefetch"),
    [(0.0, False), (0.10, False), (0.25, True), (0.50, True), (1.0, False)],
)
def test_store_outputs_identical(
    reference: ResidentRun, policy: str, budget: float, prefetch: bool
) -> None:
    """Every policy x budget x prefetch decodes exactly like the all-resident model."""
    cfg = StoreConfig(
        fast_budget_bytes=int(budget * TOTAL), policy=policy, prefetch=prefetch, dtype="float16"
    )
    res, store = store_run(reference, PROMPTS, cfg)
    assert res.tokens == reference.result.tokens
    assert same_logits(res, reference.result)
    st = store.stats
    assert st.peak_resident_bytes <= cfg.fast_budget_bytes
    assert st.demand_accesses == len(reference.demands)
    hits = sum(map(sum, st.expert_hits))
    misses = sum(map(sum, st.expert_misses))
    assert hits + misses == st.demand_accesses
    if budget == 0.0:
        assert hits == 0 and st.tiers["disk"].hits == st.demand_accesses
    if budget == 1.0:
        assert misses == len(set(reference.demands))  # compulsory misses only


def test_store_holds_only_resident_experts(reference: ResidentRun) -> None:
    """With the store attached the model keeps no stacked expert tensors."""
    from moe_helpers import runner

    from batonserve.workers.expert_store import ExpertStore, attach_store

    r = runner()
    all_bytes = sum(p.numel() * p.element_size() for p in r.model.parameters())
    store = ExpertStore(r.model_dir, StoreConfig(fast_budget_bytes=EXPERT_BYTES * 8), reference.ctx)
    attach_store(r.model, store)
    left = sum(p.numel() * p.element_size() for p in r.model.parameters())
    assert all_bytes - left == TOTAL
    store.close()

"""Lockstep prefetch (what tensor-parallel ranks run): what is resident, hit, missed and prefetched
depends on the demand sequence alone, not on how long the background reads take."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from moe_helpers import PROMPTS, ResidentRun, runner, same_logits

from batonserve.workers.expert_store import ExpertStore, RoutingPredictor, StoreConfig, attach_store
from batonserve.workers.expert_store.decode import greedy_decode
from batonserve.workers.expert_store.disk import DiskTier
from batonserve.workers.expert_store.predictor import default_predictor_path
from batonserve.workers.tp.expert_store import residency

EXPERT_BYTES = 3 * 256 * 64 * 2  # one demo-moe expert in float16


class JitteryDisk(DiskTier):
    """Reads off the forward's thread (the prefetch reads) take a random 0-4 ms."""

    def __init__(self, *args: Any, seed: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._rng = random.Random(seed)
        self._forward_thread = threading.get_ident()

    def read(self, key: Any, out: Any = None):  # type: ignore[no-untyped-def]
        if threading.get_ident() != self._forward_thread:
            time.sleep(self._rng.uniform(0.0, 0.004))
        return super().read(key, out)


def _run(reference: ResidentRun, seed: int | None, slab: bool) -> tuple[Any, ExpertStore]:
    """Greedy decode of PROMPTS from a lockstep-prefetching LRU store holding a quarter of the
    experts' bytes (seed: reads jittered with that seed; None: plain reads). Without `slab` the
    tier holds tensors read per expert, as on a GPU (planned experts get them when collected)."""
    r = runner()
    cfg = StoreConfig(
        fast_budget_bytes=16 * EXPERT_BYTES, policy="lru", prefetch=True, prefetch_lockstep=True
    )
    store = ExpertStore(r.model_dir, cfg, reference.ctx)
    if not slab:
        store._slab = None
    if seed is not None:
        store.disk.close()
        store.disk = JitteryDisk(r.model_dir, "float16", seed=seed)
    pred = RoutingPredictor.load(default_predictor_path("demo-moe"))
    ctl = attach_store(r.model, store, pred)
    ctl.forecast_from_embed = False  # as under TP
    try:
        res = greedy_decode(r, PROMPTS, len(reference.result.tokens[0]), keep_logits=True)
    finally:
        store.close()
    return res, store


@pytest.mark.parametrize("slab", [True, False], ids=["slab", "tensors"])
def test_residency_does_not_depend_on_read_timing(reference: ResidentRun, slab: bool) -> None:
    runs = [_run(reference, seed, slab) for seed in (None, 1, 2)]
    for res, _ in runs:
        assert same_logits(res, reference.result)
    first = residency(runs[0][1])
    for _, store in runs[1:]:
        assert residency(store) == first
    st = runs[0][1].stats
    hits_from_prefetch = st.demand_hits_from_prefetch
    print(
        f"lockstep: hit rate {st.hit_rate:.2f}, prefetched {st.prefetch_issued}, used "
        f"{st.prefetch_used}, dropped {st.prefetch_dropped}; late (jittered) "
        f"{[s.stats.late_prefetch for _, s in runs]}"
    )
    assert st.prefetch_issued > 0 and 0 < st.prefetch_used <= st.prefetch_issued
    assert 0 < hits_from_prefetch <= st.prefetch_used
    assert runs[0][1].planned is not None and runs[0][1].prefetcher is None

"""Prefetch under tensor parallelism: at TP=2 with half the experts' bytes resident per rank and a
trained predictor, greedy tokens equal TP=1 all-resident, both ranks hold, hit, miss and prefetch
the same experts (though rank 1's prefetch reads are slowed), and prefetched experts are used."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_tp_parity import TOL, _run
from testkit.gloo_ranks import run_ranks

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.disk import DiskTier
from batonserve.workers.expert_store.predictor_cache import CACHE_ENV, find_predictor
from batonserve.workers.expert_store.predictor_training import train_for_model
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.tp import TPShard
from batonserve.workers.tp.expert_store import check_same_residency, residency

# name -> cache policy: LRU (forecasts only prefetch) and predictive (they also steer eviction)
POLICIES = {"mixtral": "lru", "qwen2_moe": "predictive"}
STEPS = 16  # decode steps
SLOW_READ_S = 0.005  # rank 1's prefetch reads take this much longer


def _config(policy: str = "") -> EngineConfig:
    return EngineConfig(
        dtype="float32",
        num_kv_blocks=32,
        block_size=4,
        expert_cache_policy=policy,
        expert_cache_fraction=0.5,
        expert_prefetch=True,
    )


@pytest.fixture(scope="module")
def trained(
    tp_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, str], str]]:
    """The tiny MoE models with a predictor each, in a private cache: (models, cache dir)."""
    cache = str(tmp_path_factory.mktemp("predictor-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, cache)
        models = {name: str(tp_models[name]) for name in POLICIES}
        for path in models.values():
            train_for_model(Path(path), seed=0, length=32, max_chunks=8, steps=40)
            assert find_predictor(Path(path)) is not None
        yield models, cache


def _prefetching(rank: int, world: int, arg: tuple[dict[str, str], str]) -> dict[str, Any]:
    """Rank body: every model served from this rank's prefetching store."""
    models, cache = arg
    os.environ[CACHE_ENV] = cache
    if rank == 1:  # the ranks' read timings differ; what they hold must not
        read, forward = DiskTier.read, threading.get_ident()

        def slow_read(self: DiskTier, key: Any, out: Any = None) -> Any:
            if threading.get_ident() != forward:
                time.sleep(SLOW_READ_S)
            return read(self, key, out)

        DiskTier.read = slow_read  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    for name, path in models.items():
        tp = TPShard(rank, world)
        runner = ModelRunner(path, _config(POLICIES[name]), tp)
        try:
            res = _run(runner, STEPS)
            store = runner.expert_store
            assert store is not None
            check_same_residency(store, tp)  # raises on every rank if any rank disagrees
            st = store.stats
            out[name] = {
                **res,
                "residency": residency(store),
                "lockstep": store.planned is not None and store.prefetcher is None,
                "from_prefetch": st.demand_hits_from_prefetch,
                "late": st.late_prefetch,
            }
        finally:
            runner.close()
    return out


def test_tp2_prefetch_is_deterministic_and_used(
    trained: tuple[dict[str, str], str], tmp_path: Path
) -> None:
    models, _ = trained
    ref = {name: _run(ModelRunner(p, _config()), STEPS) for name, p in models.items()}
    ranks = run_ranks(_prefetching, 2, trained, tmp_path)
    for name in models:
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["tokens"] == r1["tokens"] == ref[name]["tokens"], name
        for key in ("prefill", "decode"):
            torch.testing.assert_close(r0[key], ref[name][key], atol=TOL, rtol=0, msg=name)
        assert r0["lockstep"] and r1["lockstep"], name
        assert r0["residency"] == r1["residency"], name
        _, hits, misses, (issued, used, dropped) = r0["residency"]
        print(
            f"{name}: hits {sum(hits)}, misses {sum(misses)}; prefetched {issued}, used {used}, "
            f"dropped {dropped}; demand hits from prefetch {r0['from_prefetch']}; "
            f"late reads rank 0 / 1: {r0['late']} / {r1['late']}"
        )
        assert sum(hits) > 0 and sum(misses) > 0, name
        assert 0 < used <= issued and r0["from_prefetch"] > 0, name

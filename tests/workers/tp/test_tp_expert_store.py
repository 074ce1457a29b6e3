"""The tiered expert store per TP rank: at TP=2 with half the experts' bytes resident, greedy tokens
equal TP=1 all-resident, each rank holds and reads half of what a TP=1 store does, and both ranks
make the same cache decisions (hits, misses and resident experts) as each other and as TP=1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_tp_parity import TOL, _run
from testkit.gloo_ranks import run_ranks

from batonserve.workers.config import EngineConfig
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.tp import TPShard
from batonserve.workers.tp.expert_store import check_same_residency, residency

FRACTION = 0.5
# name -> cache policy; demo-moe's bundled predictor steers the predictive one
POLICIES = {"mixtral": "lru", "qwen2_moe": "lru", "demo-moe": "predictive"}


def _config(policy: str = "") -> EngineConfig:
    return EngineConfig(
        dtype="float32",
        num_kv_blocks=32,
        block_size=4,
        expert_cache_policy=policy,
        expert_cache_fraction=FRACTION,
    )


def _with_store(rank: int, world: int, models: dict[str, str]) -> dict[str, Any]:
    """Rank body: every model served from this rank's store; tokens, logits and store figures."""
    out: dict[str, Any] = {}
    for name, path in models.items():
        tp = TPShard(rank, world)
        runner = ModelRunner(path, _config(POLICIES[name]), tp)
        res = _run(runner)
        store = runner.expert_store
        assert store is not None
        check_same_residency(store, tp)  # raises on every rank if any rank disagrees
        out[name] = {
            "tokens": res["tokens"],
            "prefill": res["prefill"],
            "decode": res["decode"],
            "resident": store.stats.resident_bytes,
            "expert_bytes": store.expert_bytes,
            "experts": store.ctx.num_layers * store.ctx.num_experts,
            "read_per_expert": store.disk.bytes_read / max(1, store.disk.reads),
            "residency": residency(store),
            "lockstep": store.planned is not None,
        }
        runner.close()
    return out


@pytest.fixture(scope="module")
def models(tp_models: dict[str, Path]) -> dict[str, str]:
    return {
        "mixtral": str(tp_models["mixtral"]),
        "qwen2_moe": str(tp_models["qwen2_moe"]),
        "demo-moe": str(resolve_model_dir("demo-moe")),
    }


@pytest.fixture(scope="module")
def tp1(models: dict[str, str]) -> dict[str, Any]:
    """TP=1: all-resident tokens and logits, and a TP=1 store's figures at the same fraction."""
    return {
        "resident": {name: _run(ModelRunner(p, _config())) for name, p in models.items()},
        "store": _with_store(0, 1, models),
    }


def test_tp2_store_matches_tp1(models: dict[str, str], tp1: dict[str, Any], tmp_path: Path) -> None:
    ranks = run_ranks(_with_store, 2, models, tmp_path)
    for name in models:
        ref, one = tp1["resident"][name], tp1["store"][name]
        r0, r1 = ranks[0][name], ranks[1][name]
        # same tokens and logits as the all-resident TP=1 model
        assert r0["tokens"] == r1["tokens"] == ref["tokens"], name
        for key in ("prefill", "decode"):
            torch.testing.assert_close(r0[key], ref[key], atol=TOL, rtol=0, msg=name)
        # each rank holds and reads its half of every expert
        for r in (r0, r1):
            # demo-moe's bundled predictor turns prefetch on: in lockstep under TP
            assert r["lockstep"] == (name == "demo-moe"), name
            assert r["expert_bytes"] * 2 == one["expert_bytes"], name
            assert r["resident"] * 2 == one["resident"], name
            assert r["read_per_expert"] * 2 == pytest.approx(one["read_per_expert"]), name
            assert 0 < r["resident"] <= FRACTION * r["expert_bytes"] * r["experts"], name
        # same decisions on both ranks; with LRU also the same as a TP=1 store's (identical
        # routing; the predictive policy's TP=1 forecasts also use the embedding, and prefetch)
        assert r0["residency"] == r1["residency"], name
        if POLICIES[name] == "lru":
            assert r0["residency"] == one["residency"], name
        hits, misses = sum(r0["residency"][1]), sum(r0["residency"][2])
        print(
            f"{name}: TP=1 store {one['resident']} B resident, TP=2 ranks "
            f"{r0['resident']} / {r1['resident']} B; hits {hits}, misses {misses} on each rank"
        )
        assert hits > 0 and misses > 0, (name, hits, misses)  # both paths exercised


def test_disk_tier_reads_only_the_rank_slice(tp_models: dict[str, Path]) -> None:
    """A sliced read is the whole expert's rows of gate/up and columns of down, at half the bytes."""
    from batonserve.workers.expert_store.disk import DiskTier
    from batonserve.workers.expert_store.types import ExpertKey

    path = tp_models["mixtral"]
    whole = DiskTier(path, "float32")
    full = whole.read(ExpertKey(1, 3))
    inter = full.w_down.shape[1]
    for i0, i1 in ((0, inter // 2), (inter // 2, inter)):
        part = DiskTier(path, "float32", inter=(i0, i1))
        got = part.read(ExpertKey(1, 3))
        gate, up = full.w_gate_up[:inter], full.w_gate_up[inter:]
        assert torch.equal(got.w_gate_up, torch.cat([gate[i0:i1], up[i0:i1]]))
        assert torch.equal(got.w_down, full.w_down[:, i0:i1])
        assert part.bytes_read * 2 == whole.bytes_read
        part.close()
    whole.close()


def _disagree(rank: int, world: int, extra: int) -> str:
    """Rank 1 differs from rank 0 by one hit (extra 0), one more expert (1) or prefetch (2)."""
    from types import SimpleNamespace

    from batonserve.workers.expert_store.types import ExpertKey

    keys = {ExpertKey(0, 1): None, **({ExpertKey(1, 2): None} if rank and extra == 1 else {})}
    hits = [[0, 3 + (rank if not extra else 0)], [1, 0]]
    store = SimpleNamespace(
        fast=SimpleNamespace(entries=keys),
        stats=SimpleNamespace(
            expert_hits=hits,
            expert_misses=[[1, 0], [0, 0]],
            prefetch_issued=rank if extra == 2 else 0,
            prefetch_used=0,
            prefetch_dropped=0,
        ),
    )
    try:
        check_same_residency(store, TPShard(rank, world))  # type: ignore[arg-type]
    except RuntimeError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("extra", [0, 1, 2], ids=["same-size", "another-expert", "prefetch"])
def test_disagreeing_ranks_are_named(tmp_path: Path, extra: int) -> None:
    errors = run_ranks(_disagree, 2, extra, tmp_path)
    assert "rank(s) [1]" in errors[0] and "rank(s) [0]" in errors[1], errors

"""Config errors of served expert parallelism: each names the field (no Ray needed)."""

from __future__ import annotations

import itertools

import pytest

from batonserve.cluster.config import ConfigError, PoolConfig, ServeConfig, load_config
from batonserve.cluster.model_meta import check_model_expert_parallel
from batonserve.workers.config import EngineConfig
from batonserve.workers.engine import Engine
from batonserve.workers.models.config import ModelConfig
from batonserve.workers.models.paths import resolve_model_dir
from batonserve.workers.parallel.ep_slice import check_expert_parallel, slice_of
from batonserve.workers.sp_serving.config import SequenceParallelConfig


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_size_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ValueError, match=r"expert_parallel_size: must be an integer >= 1"):
        EngineConfig(expert_parallel_size=bad)  # type: ignore[arg-type]


def test_size_with_expert_cache_policy() -> None:
    with pytest.raises(ValueError, match=r"expert_parallel_size: 2 .*expert_cache_policy"):
        EngineConfig(expert_parallel_size=2, expert_cache_policy="lru")


def test_dense_model() -> None:
    mc = ModelConfig.from_dir(resolve_model_dir("demo"))
    with pytest.raises(ValueError, match=r"expert_parallel_size: 2 needs a MoE model.*'demo'"):
        check_expert_parallel(EngineConfig(expert_parallel_size=2), mc, "demo")
    with pytest.raises(ConfigError, match=r"engine.expert_parallel_size: 2 needs a MoE model"):
        check_model_expert_parallel(
            ServeConfig(model="demo", engine=EngineConfig(expert_parallel_size=2))
        )


def test_experts_not_divisible() -> None:
    cfg = ServeConfig(model="demo-moe", engine=EngineConfig(expert_parallel_size=3))
    with pytest.raises(ConfigError, match=r"engine.expert_parallel_size: 3 must divide .*\(16\)"):
        check_model_expert_parallel(cfg)
    check_model_expert_parallel(
        ServeConfig(model="demo-moe", engine=EngineConfig(expert_parallel_size=4))
    )


def test_offline_engine_refuses() -> None:
    with pytest.raises(ValueError, match=r"expert_parallel_size: 2 .*batonserve serve"):
        Engine("demo-moe", EngineConfig(device="cpu", expert_parallel_size=2))


def test_ring_group_conflict() -> None:
    prefill = PoolConfig(name="prefill", role="prefill", replicas=2)
    decode = PoolConfig(name="decode", role="decode")
    with pytest.raises(
        ConfigError, match=r"engine.expert_parallel_size: 2 .*sequence_parallel.enabled"
    ):
        ServeConfig(
            engine=EngineConfig(expert_parallel_size=2),
            pools=(prefill, decode),
            sequence_parallel=SequenceParallelConfig(enabled=True),
        )
    # no ring group (one prefill replica): fine
    ServeConfig(
        engine=EngineConfig(expert_parallel_size=2),
        sequence_parallel=SequenceParallelConfig(enabled=True),
    )


def test_yaml(tmp_path: object) -> None:
    """The YAML edge: strict types, and the ring conflict on load."""
    cfg = load_config(overrides={"engine.expert_parallel_size": 2, "model": "demo-moe"})
    assert cfg.engine.expert_parallel_size == 2
    with pytest.raises(ValueError, match=r"expert_parallel_size"):
        load_config(overrides={"engine.expert_parallel_size": "two"})
    with pytest.raises(ConfigError, match=r"sequence_parallel.enabled"):
        load_config(
            overrides={
                "engine.expert_parallel_size": 2,
                "sequence_parallel.enabled": True,
                "pools": [{"name": "prefill", "role": "prefill", "replicas": 2}],
            }
        )


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_slices_cover_rows(rows: int, world: int) -> None:
    """Contiguous, in order, sizes differ by at most one; empty ranks allowed."""
    parts = [slice_of(rows, world, r) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1

"""A TP pool accepts the expert store (it works per rank) and still refuses what cannot work with
TP: expert parallelism and token regrouping, with an error naming the setting."""

from __future__ import annotations

import pytest

from batonserve.cluster.config import ConfigError, PoolConfig, ServeConfig
from batonserve.workers.config import EngineConfig


def _config(**engine: object) -> ServeConfig:
    pools = [
        PoolConfig("prefill", "prefill"),
        PoolConfig("decode", "decode", tensor_parallel_size=2),
    ]
    return ServeConfig(model="demo-moe", engine=EngineConfig(**engine), pools=pools)  # type: ignore[arg-type]


def test_expert_store_is_accepted_under_tp() -> None:
    cfg = _config(expert_cache_policy="lru", expert_cache_fraction=0.5)
    assert cfg.engine.expert_cache_policy == "lru"


@pytest.mark.parametrize(
    ("setting", "value"), [("expert_parallel_size", 2), ("moe_regroup_batch", 8)]
)
def test_ep_and_regrouping_stay_refused_under_tp(setting: str, value: int) -> None:
    with pytest.raises(
        ConfigError, match=f"tensor_parallel_size: 2 cannot be combined with engine.{setting}"
    ):
        _config(**{setting: value})

"""The scheduler section of ServeConfig: defaults, YAML round trip, errors naming the field."""

from __future__ import annotations

import pytest

from batonserve.cluster.config import ServeConfig, dump_config, load_config
from batonserve.cluster.scheduling import POLICIES, ClusterScheduler, SchedulerConfig
from batonserve.cluster.schema import ConfigError


def test_default_and_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert ServeConfig().scheduler == SchedulerConfig()
    cfg = load_config(
        overrides={"scheduler.policy": "round_robin", "scheduler.admission.max_queue_len": 4}
    )
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again.scheduler == cfg.scheduler
    assert isinstance(ClusterScheduler(again.scheduler).policy, POLICIES.get("round_robin"))


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("scheduler.policy", "fastest", "scheduler.policy"),
        ("scheduler.in_place_max_tokens", -1, "scheduler.in_place_max_tokens"),
        (
            "scheduler.mixed_pool.return_prefill_tokens",
            10**6,
            "scheduler.mixed_pool.borrow_prefill_tokens",
        ),
        (
            "scheduler.admission.kv_headroom_fraction",
            1.5,
            "scheduler.admission.kv_headroom_fraction",
        ),
        ("scheduler.admission.max_queue_len", "x", "scheduler.admission.max_queue_len"),
    ],
)
def test_bad_values_name_the_field(key: str, value: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides={key: value})

"""Fast checks (no Ray) of the ring's serving pieces: group size choice, config errors, leader
choice, row runs, and the sequence_parallel metrics input."""

from __future__ import annotations

import pytest
import torch

from batonserve.cluster.config import ConfigError, load_config
from batonserve.cluster.metrics import Metrics
from batonserve.workers.parallel.layout import rank_positions
from batonserve.workers.sp_serving.config import SequenceParallelConfig
from batonserve.workers.sp_serving.report import SPStepReport
from batonserve.workers.sp_serving.types import contiguous_runs, last_position_rank


def test_group_size_from_threshold_and_tokens_per_rank() -> None:
    sp = SequenceParallelConfig(
        enabled=True, threshold_tokens=100, tokens_per_rank=64, max_group_size=4
    )
    assert sp.group_size(99, 4) == 0  # below the threshold: normal path
    assert sp.group_size(100, 4) == 2  # ceil(100 / 64) = 2
    assert sp.group_size(129, 4) == 3
    assert sp.group_size(10_000, 4) == 4  # capped by the group
    assert sp.group_size(10_000, 3) == 3  # ... and by the members available
    assert sp.group_size(10_000, 1) == 0  # no ring without two members
    assert (
        SequenceParallelConfig(enabled=True, threshold_tokens=10, tokens_per_rank=1000).group_size(
            10, 4
        )
        == 2
    )  # at least 2
    assert SequenceParallelConfig(enabled=False).group_size(10**6, 4) == 0


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"sequence_parallel\.max_group_size"):
        load_config(overrides={"sequence_parallel.max_group_size": 1})
    with pytest.raises(ConfigError, match=r"sequence_parallel\.schedule"):
        load_config(overrides={"sequence_parallel.schedule": "fast"})
    cfg = load_config(
        overrides={"sequence_parallel.enabled": True, "sequence_parallel.layout": "striped"}
    )
    assert cfg.sequence_parallel.enabled and cfg.sequence_parallel.layout == "striped"


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize(("length", "size"), [(2, 2), (7, 3), (64, 2), (101, 3), (2999, 4)])
def test_leader_holds_the_last_position_and_runs_cover_each_shard(
    layout: str, length: int, size: int
) -> None:
    leader = last_position_rank(length, size, layout)
    assert int(rank_positions(length, size, leader, layout)[-1]) == length - 1
    covered: list[int] = []
    for r in range(size):
        pos = rank_positions(length, size, r, layout)
        for a, b, start in contiguous_runs(pos):
            assert pos[a:b].tolist() == list(range(start, start + b - a))
            covered += range(start, start + b - a)
    assert sorted(covered) == list(range(length))
    assert contiguous_runs(torch.zeros(0, dtype=torch.long)) == []


def test_sequence_parallel_metrics_series() -> None:
    m = Metrics("demo", ray_mirror=False)
    for rank in range(2):
        m.sequence_parallel(
            SPStepReport(1, "r#1", "ring", 2, rank, 100, 0.02, 0.01, 0.004, 0.05, 1000)
        )
    text = m.exposition().decode()
    assert 'batonserve_sp_prefills_total{model="demo"} 1.0' in text
    assert 'batonserve_sp_compute_seconds_count{model="demo"} 2.0' in text
    assert 'batonserve_sp_comm_seconds_sum{model="demo"} 0.02' in text
    assert 'batonserve_sp_exposed_comm_seconds_sum{model="demo"} 0.008' in text
    assert 'batonserve_sp_comm_hidden_ratio{model="demo"} 0.6' in text
    with pytest.raises(ValueError, match="sequence_parallel"):
        m.sequence_parallel(SPStepReport(2, "r#2", "ring", 2, 0, 100, -1.0, 0.0, 0.0, 0.0, 0))


def test_sliding_window_model_refuses_to_join_before_any_collective() -> None:
    from types import SimpleNamespace

    import torch.distributed as dist

    from batonserve.workers.engine_core import EngineCore
    from batonserve.workers.sp_serving.member import RingMember
    from batonserve.workers.sp_serving.types import RingSetup

    cfg = SimpleNamespace(num_layers=2, layer_window=lambda i: 16 if i == 1 else None)
    core = SimpleNamespace(runner=SimpleNamespace(model_config=cfg))
    core.has_sliding_window = lambda: EngineCore.has_sliding_window(core)  # type: ignore[arg-type]
    member = RingMember(core, None)  # type: ignore[arg-type]
    setup = RingSetup(1, "127.0.0.1", 1, 0, ("p-0", "p-1"), "gloo", 1.0, "auto", "zigzag")
    with pytest.raises(ValueError, match="sliding-window"):
        member.join(setup)
    assert not dist.is_initialized() and member.setup is None

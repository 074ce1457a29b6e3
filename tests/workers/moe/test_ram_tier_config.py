"""The RAM tier setting: validated, on by default on a GPU, capped by free host memory, off on CPU;
and the order in which experts are warmed into the tiers."""

from __future__ import annotations

import pytest
import torch

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store import loader
from batonserve.workers.expert_store.loader import ram_budget_bytes, warm_order
from batonserve.workers.expert_store.types import ExpertKey


def test_setting_is_validated_and_on_by_default() -> None:
    assert EngineConfig().expert_cache_ram_fraction == 0.5
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="expert_cache_ram_fraction"):
            EngineConfig(expert_cache_ram_fraction=bad)  # type: ignore[arg-type]


def test_budget_on_gpu_only_and_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(loader, "available_host_bytes", lambda: 10_000)
    assert ram_budget_bytes(0.5, 8_000, gpu) == 4_000
    assert ram_budget_bytes(1.0, 80_000, gpu) == 5_000  # half of the available host memory
    assert ram_budget_bytes(0.0, 8_000, gpu) == 0
    assert ram_budget_bytes(0.5, 8_000, cpu) == 0  # the compute tier already is RAM
    monkeypatch.setattr(loader, "available_host_bytes", lambda: 0)  # unknown: no cap
    assert ram_budget_bytes(0.5, 8_000, gpu) == 4_000


def test_warm_order() -> None:
    """Without popularity one expert of every layer in turn; with it, most routed first."""
    assert warm_order(2, 2, None) == [
        ExpertKey(0, 0),
        ExpertKey(1, 0),
        ExpertKey(0, 1),
        ExpertKey(1, 1),
    ]
    pop = ((1, 9), (5, 0))
    assert warm_order(2, 2, pop)[:2] == [ExpertKey(0, 1), ExpertKey(1, 0)]

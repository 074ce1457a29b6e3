"""A few fixed seeds of the chaos harness (tests/chaos/chaos.py) in CI: seeded worker kills under
concurrent streams, every stream's tokens checked, pools back to baseline, no handoff open."""

from __future__ import annotations

import asyncio

import pytest
from chaos import chaos

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("seed", [1, 2])
def test_chaos_seed(ray_cluster: str, seed: int) -> None:
    report = asyncio.run(chaos(seed, runs=2, address=ray_cluster, namespace=f"chaos-{seed}"))
    print(report.line())
    assert not report.failures, report.failures
    assert report.runs == 2 and sum(report.faults.values()) >= 2

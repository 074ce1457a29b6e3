"""A few fixed seeds of the chaos harness (tests/chaos/chaos.py) in CI: seeded worker kills under
concurrent streams, every stream's tokens checked, pools back to baseline, no handoff open."""

from __future__ import annotations

import asyncio

import pytest
from chaos import chaos

from batonserve.workers.kv_transfer.config import TransportName

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize(("seed", "transport"), [(1, "torch_dist"), (2, "object_store")])
def test_chaos_seed(ray_cluster: str, seed: int, transport: TransportName) -> None:
    report = asyncio.run(chaos(seed, 2, ray_cluster, f"chaos-{seed}", transport=transport))
    print(report.line())
    assert not report.failures, report.failures
    assert report.runs == 2 and sum(report.faults.values()) >= 2

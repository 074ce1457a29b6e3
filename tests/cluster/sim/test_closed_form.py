"""Known closed forms: a single FCFS queue with a fixed service time (D/D/1, M/D/1)."""

from __future__ import annotations

import statistics

import pytest
from sim_helpers import single_server

from batonserve.cluster.sim.trace import LengthDist, synthetic_trace

ONE = LengthDist("constant", 1)
PROMPT = LengthDist("constant", 100)  # one chunk: one step of fixed length per request


def waits(service: float, rate: float, n: int, arrivals: str, seed: int = 0) -> list[float]:
    trace = synthetic_trace(n, rate, PROMPT, ONE, arrivals, seed)  # type: ignore[arg-type]
    result = single_server(service).run(trace)
    assert all(r.num_finishes == 1 for r in result.records)
    # A one-token request ends with its first token: TTFT = queueing + one service time.
    return [r.ttft - service for r in result.records]


def test_dd1_underloaded_never_waits() -> None:
    w = waits(service=0.5, rate=1.0, n=200, arrivals="uniform")
    assert max(w) == pytest.approx(0.0, abs=1e-9)


def test_dd1_overloaded_waits_grow_linearly() -> None:
    # Arrivals every 0.4 s, service 0.5 s: request k waits k x 0.1 s.
    w = waits(service=0.5, rate=2.5, n=100, arrivals="uniform")
    assert w == pytest.approx([0.1 * k for k in range(100)], abs=1e-9)


def test_md1_mean_wait_matches_pollaczek_khinchine() -> None:
    service, rate = 0.5, 1.0
    rho = rate * service
    expected = rho * service / (2 * (1 - rho))  # M/D/1: Wq = rho S / (2 (1 - rho)) = 0.25 s
    w = waits(service, rate, n=12_000, arrivals="poisson", seed=3)
    assert statistics.mean(w) == pytest.approx(expected, rel=0.08)

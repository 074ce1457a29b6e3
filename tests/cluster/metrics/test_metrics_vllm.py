"""vLLM parity: each core vLLM v1 series exists under our prefix with its type, and the request
phases (queue, prefill, decode, inference) are measured from the first schedule, not the first token.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batonserve.cluster.api import Usage
from batonserve.cluster.metrics import Metrics, build_series
from batonserve.cluster.metrics_clock import RequestClock

ROOT = Path(__file__).resolve().parents[3]
M = {"model": "demo"}
# vLLM's v1 core set and each series' type there (the vllm: prefix and _total as exported).
VLLM = {
    "num_requests_running": "gauge",
    "num_requests_waiting": "gauge",
    "kv_cache_usage_perc": "gauge",
    "prefix_cache_queries_total": "counter",
    "prefix_cache_hits_total": "counter",
    "num_preemptions_total": "counter",
    "prompt_tokens_total": "counter",
    "generation_tokens_total": "counter",
    "request_success_total": "counter",
    "time_to_first_token_seconds": "histogram",
    "inter_token_latency_seconds": "histogram",
    "e2e_request_latency_seconds": "histogram",
    "request_queue_time_seconds": "histogram",
    "request_prefill_time_seconds": "histogram",
    "request_decode_time_seconds": "histogram",
    "request_inference_time_seconds": "histogram",
    "request_time_per_output_token_seconds": "histogram",
    "request_prompt_tokens": "histogram",
    "request_generation_tokens": "histogram",
    "iteration_tokens_total": "histogram",
    "request_params_max_tokens": "histogram",
    "request_params_n": "histogram",
    "cache_config_info": "gauge",
}


def test_every_vllm_series_exists_with_its_type_and_the_docs_map_them() -> None:
    specs = {s.name: s for s in build_series(2048)}
    for name, kind in VLLM.items():
        ours = f"batonserve_{name}"
        assert ours in specs and specs[ours].kind == kind, ours
    assert "finished_reason" in specs["batonserve_request_success_total"].labels
    text = (ROOT / "docs/operations.md").read_text()
    rows = dict(re.findall(r"^\| `vllm:([a-z0-9_]+)` \| `(batonserve_[a-z0-9_]+)` \|", text, re.M))
    assert rows == {name: f"batonserve_{name}" for name in VLLM}


class _Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_phases_start_at_the_schedule_even_when_it_is_known_late(scrape) -> None:
    m, now = Metrics("demo", ray_mirror=False), _Clock()
    c = RequestClock(m, prompt_tokens=4, now=now)
    now.t += 1.0
    c.tokens(1)  # first token at +1.0 s, before the cluster said when the request was scheduled
    now.t += 0.5
    c.tokens(2, scheduled_at=50.25)  # ... it had been scheduled at +0.25 s
    now.t += 0.5
    c.tokens(1, scheduled_at=50.9)  # a later (resumed attempt's) schedule changes nothing
    c.finished("OK", "length", Usage(4, 4, 0))
    s = scrape(m)
    assert s.value("batonserve_request_queue_time_seconds_sum", **M) == pytest.approx(0.25)
    assert s.value("batonserve_request_prefill_time_seconds_sum", **M) == pytest.approx(0.75)
    assert s.value("batonserve_request_decode_time_seconds_sum", **M) == pytest.approx(1.0)
    assert s.value("batonserve_request_inference_time_seconds_sum", **M) == pytest.approx(1.75)
    tpot = s.value("batonserve_request_time_per_output_token_seconds_sum", **M)
    assert tpot == pytest.approx(1.0 / 3)
    assert s.value("batonserve_time_to_first_token_seconds_sum", **M) == pytest.approx(1.0)
    assert s.value("batonserve_request_success_total", finished_reason="length", **M) == 1


def test_an_exact_schedule_moves_the_request_to_running_before_its_first_token(scrape) -> None:
    m, now = Metrics("demo", ray_mirror=False), _Clock()
    c = RequestClock(m, prompt_tokens=4, now=now)
    assert scrape(m).value("batonserve_num_requests_waiting", **M) == 1
    now.t += 0.2
    c.tokens(0, scheduled_at=50.1)  # a delta with no token yet, but the schedule is known
    s = scrape(m)
    assert s.value("batonserve_num_requests_waiting", **M) == 0
    assert s.value("batonserve_num_requests_running", **M) == 1
    c.finished("CANCELLED", "abort")
    s = scrape(m)
    assert s.value("batonserve_request_queue_time_seconds_sum", **M) == pytest.approx(0.1)
    assert s.value("batonserve_request_success_total", finished_reason="abort", **M) in (0, None)

"""RequestClock: queue time, TTFT and gaps measured on a scripted clock, gauges always balance."""

from __future__ import annotations

import pytest

from batonserve.cluster.api import Usage
from batonserve.cluster.metrics import Metrics
from batonserve.cluster.metrics_clock import RequestClock

M = {"model": "demo"}


class _Clock:
    """A hand-moved monotonic clock."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_clock_reports_queue_ttft_gaps_and_duration(scrape) -> None:
    m, now = Metrics("demo"), _Clock()
    c = RequestClock(m, prompt_tokens=9, now=now)
    now.t += 0.5
    c.started()
    now.t += 0.25
    c.tokens(1)  # TTFT 0.75 s
    now.t += 0.2
    c.tokens(2)  # two tokens after 0.2 s: gaps of 0.1 s
    now.t += 0.05
    c.tokens(1)
    s = scrape(m)
    assert s.value("batonserve_num_requests_running", **M) == 1
    c.finished("OK", "length", Usage(prompt_tokens=9, completion_tokens=4, cached_tokens=3))
    c.finished("OK", "length")  # a second report (e.g. from a finally block) is ignored
    s = scrape(m)
    assert s.value("batonserve_request_queue_time_seconds_sum", **M) == pytest.approx(0.5)
    assert s.value("batonserve_time_to_first_token_seconds_sum", **M) == pytest.approx(0.75)
    assert s.value("batonserve_inter_token_latency_seconds_count", **M) == 3
    assert s.value("batonserve_inter_token_latency_seconds_sum", **M) == pytest.approx(0.25)
    assert s.value("batonserve_e2e_request_latency_seconds_sum", **M) == pytest.approx(1.0)
    assert s.value("batonserve_requests_total", code="OK", finish_reason="length", **M) == 1
    assert s.value("batonserve_generation_tokens_total", **M) == 4
    assert s.value("batonserve_cached_prompt_tokens_total", **M) == 3
    assert s.value("batonserve_requests_in_flight", **M) == 0
    assert c.done


def test_first_delta_starts_the_request_and_errors_use_counted_tokens(scrape) -> None:
    m, now = Metrics("demo"), _Clock()
    c = RequestClock(m, prompt_tokens=5, now=now)
    now.t += 0.3
    c.tokens(3)  # the cluster never reported a start: the first delta implies it
    c.finished("UNAVAILABLE")  # the worker died without usage
    s = scrape(m)
    assert s.value("batonserve_request_queue_time_seconds_sum", **M) == pytest.approx(0.3)
    assert s.value("batonserve_requests_total", code="UNAVAILABLE", finish_reason="none", **M) == 1  # fmt: skip
    assert s.value("batonserve_prompt_tokens_total", **M) == 5
    assert s.value("batonserve_generation_tokens_total", **M) == 3
    assert s.value("batonserve_num_requests_running", **M) == 0


def test_cancel_before_start_leaves_no_running_request(scrape) -> None:
    m = Metrics("demo")
    c = RequestClock(m, prompt_tokens=5, now=_Clock())
    c.finished("CANCELLED", "abort")
    c.tokens(1)  # late deltas after the end are ignored
    s = scrape(m)
    assert s.value("batonserve_num_requests_waiting", **M) == 0
    assert s.value("batonserve_num_requests_running", **M) == 0
    assert s.value("batonserve_time_to_first_token_seconds_count", **M) == 0


def test_rejection_after_admission_leaves_the_queue_and_counts_once(scrape) -> None:
    m = Metrics("demo")
    c = RequestClock(m, prompt_tokens=5, now=_Clock())
    c.rejected("kv_exhausted")
    c.finished("RESOURCE_EXHAUSTED")  # a finally block's report after the rejection is ignored
    s = scrape(m)
    assert s.value("batonserve_num_requests_waiting", **M) == 0
    assert s.value("batonserve_requests_in_flight", **M) == 0
    assert s.value("batonserve_rejections_total", reason="kv_exhausted", **M) == 1
    assert s.value("batonserve_requests_total", code="RESOURCE_EXHAUSTED", finish_reason="none", **M) == 1  # fmt: skip
    assert s.value("batonserve_e2e_request_latency_seconds_count", **M) == 0
    started = RequestClock(m, prompt_tokens=5, now=_Clock())
    started.started()
    with pytest.raises(RuntimeError, match="already started"):
        started.rejected("queue_full")

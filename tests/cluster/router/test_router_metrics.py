"""The router reports every request's outcome to Metrics: counts by final code, tokens, TTFT."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from testkit.router_harness import RouterHarness, fakes

from batonserve.cluster.metrics import Metrics
from batonserve.proto import generation_pb2 as pb


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lbls), v in samples.items()
        if n == name and all(dict(lbls).get(k) == want for k, want in labels.items())
    )


def test_outcomes_are_counted_by_code(make_router: Callable[..., RouterHarness]) -> None:
    metrics = Metrics("tiny", max_model_len=64, ray_mirror=False)
    h = make_router(fake_config=fakes.FakeClusterConfig(num_blocks=8), metrics=metrics)
    stub = h.stub()
    sampling = pb.SamplingParams(max_tokens=5)
    texts = []
    for i in range(3):
        out = list(stub.Generate(pb.GenerateRequest(text=f"Hi {i}", sampling=sampling), timeout=10))
        texts.append(sum(len(r.token_ids) for r in out))
    with pytest.raises(grpc.RpcError) as bad:
        list(stub.Generate(pb.GenerateRequest(text=""), timeout=5))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as full:  # needs more blocks than the fake has
        list(
            stub.Generate(pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=60)))
        )
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    s = _samples(metrics)
    assert _total(s, "batonserve_requests_total", code="OK") == 3
    assert _total(s, "batonserve_requests_total", code="INVALID_ARGUMENT") == 1
    assert _total(s, "batonserve_requests_total", code="RESOURCE_EXHAUSTED") == 1
    assert _total(s, "batonserve_generation_tokens_total") == sum(texts) == 15
    assert _total(s, "batonserve_time_to_first_token_seconds_count") == 3
    assert _total(s, "batonserve_inter_token_latency_seconds_count") == 12
    # Every admitted request has left the gauges.
    assert _total(s, "batonserve_num_requests_running") == 0
    assert _total(s, "batonserve_num_requests_waiting") == 0

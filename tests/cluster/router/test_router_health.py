"""Health (liveness and per-service readiness) and server reflection."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from testkit.router_harness import RouterHarness, eventually, fakes

from batonserve.cluster.config import RouterConfig

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("batonserve.v1.Generation", "inference.GRPCInferenceService")


def _health(h: RouterHarness, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(h.channel())
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_cluster_readiness(make_router: Callable[..., RouterHarness]) -> None:
    h = make_router(fake_config=fakes.FakeClusterConfig(ready=False))
    assert _health(h, "") == SERVING  # liveness: the process answers
    assert all(_health(h, s) == NOT_SERVING for s in SERVICES)
    h.cluster.config.ready = True  # workers came up; the router polls readiness
    eventually(lambda: all(_health(h, s) == SERVING for s in SERVICES), timeout=5)


def test_drain_sets_not_serving(router: RouterHarness) -> None:
    assert _health(router, SERVICES[1]) == SERVING
    router.loop.run(router.server.drain(0.1))
    assert _health(router, "") == NOT_SERVING
    assert all(_health(router, s) == NOT_SERVING for s in SERVICES)


def _reflect(
    h: RouterHarness, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(h.channel())
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))


def test_reflection_lists_and_describes_services(router: RouterHarness) -> None:
    listed = _reflect(router, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert set(SERVICES) | {"grpc.health.v1.Health"} <= names
    described = _reflect(
        router,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="batonserve.v1.Generation"),
    )
    protos = described.file_descriptor_response.file_descriptor_proto
    assert any(b"batonserve/proto/generation.proto" in p for p in protos)


def test_reflection_can_be_turned_off(make_router: Callable[..., RouterHarness]) -> None:
    h = make_router(router_config=RouterConfig(reflection=False))
    with pytest.raises(grpc.RpcError) as info:
        _reflect(h, reflection_pb2.ServerReflectionRequest(list_services=""))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

"""Faults under load through the router over the fake cluster (no Ray): mass cancellation and
expired deadlines, overload at ten times capacity, and the router process killed and restarted.

The worker-kill faults need real workers: see test_faults_cluster.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from testkit import TESTS
from testkit.ports import free_port
from testkit.router_harness import RouterHarness, fakes, reply_script

from batonserve.cluster.bench.drivers import Connection
from batonserve.cluster.bench.runner import BenchConfig, run_bench
from batonserve.cluster.bench.workload import LengthSpec, synthetic_requests
from batonserve.cluster.metrics import Metrics
from batonserve.proto import generation_pb2 as gpb
from batonserve.proto import generation_pb2_grpc, kserve_v2_pb2_grpc
from batonserve.proto import kserve_v2_pb2 as kpb
from batonserve.workers.tokenizer import Tokenizer

Make = Callable[..., RouterHarness]
OK_ENDINGS = {"OK", "CANCELLED", "DEADLINE_EXCEEDED"}
# grpc.aio's client reports this (INTERNAL) when its own write of a stream's request races the
# call's deadline (grpc/grpc#34148); it never left the client. The server-side outcome counts
# (Metrics) show what the router really answered.
CLIENT_ARTEFACT = "Internal error from Core"


def _kserve_request(i: int, max_tokens: int) -> kpb.ModelInferRequest:
    t = kpb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
    t.contents.bytes_contents.append(f"prompt {i}".encode())
    msg = kpb.ModelInferRequest(model_name="tiny", id=str(i), inputs=[t])
    msg.parameters["max_tokens"].int64_param = max_tokens
    msg.parameters["stream"].bool_param = True
    return msg


async def _abandon(target: str, n: int, seed: int) -> dict[str, int]:
    """`n` requests, each cancelled after a few tokens or cut by a short deadline; both protocols.

    Returns how the calls ended, by status name.
    """
    rng = random.Random(seed)
    ends: dict[str, int] = {}
    details: list[str] = []
    gate = asyncio.Semaphore(48)  # bounded concurrency: the 2-core CI machine
    async with grpc.aio.insecure_channel(target) as channel:
        native = generation_pb2_grpc.GenerationStub(channel)
        kserve = kserve_v2_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(i: int) -> None:
            kind, after = i % 4, rng.randint(0, 6)
            deadline = rng.uniform(0.002, 0.08) if kind in (1, 3) else 30.0
            async with gate:
                if kind < 2:
                    req = gpb.GenerateRequest(
                        text=f"prompt {i}", sampling=gpb.SamplingParams(max_tokens=40)
                    )
                    call = native.Generate(req, timeout=deadline)
                else:
                    call = kserve.ModelStreamInfer(timeout=deadline)
                    # Written by hand: with a request iterator, grpc's writer task can race
                    # the deadline and report a client-side "Internal error from Core".
                    try:
                        await call.write(_kserve_request(i, 40))
                        await call.done_writing()
                    except Exception:  # the call ended first (deadline): its status says so
                        pass
                seen = 0
                try:
                    async for _ in call:
                        seen += 1
                        if kind in (0, 2) and seen > after:
                            call.cancel()
                            break
                    code = (await call.code()).name
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                    if code == "INTERNAL" and e.details() == CLIENT_ARTEFACT:
                        code = "DEADLINE_EXCEEDED (client-side artefact)"
                    elif code not in OK_ENDINGS:
                        details.append(f"{i} kind {kind}: {code}: {e.details()}")
                except asyncio.CancelledError:
                    code = "CANCELLED"
                ends[code] = ends.get(code, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
    assert details == [], details
    return ends


def _outcomes(metrics: Metrics) -> dict[str, float]:
    """batonserve_requests_total by code."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == "batonserve_requests_total":
                code = sample.labels["code"]
                out[code] = out.get(code, 0) + sample.value
    return {k: v for k, v in out.items() if v}


def test_thousand_cancellations_and_deadlines_leave_blocks_at_baseline(
    fault_router: Make, fault_tokenizer: Tokenizer
) -> None:
    metrics = Metrics("tiny", max_model_len=64, ray_mirror=False)
    h = fault_router(
        fake_config=fakes.FakeClusterConfig(
            num_blocks=8192, max_running=64, token_interval_s=0.003
        ),
        script=reply_script(fault_tokenizer, repeat=4),
        metrics=metrics,
    )
    assert h.cluster.used_blocks == 0  # the baseline
    t0 = time.perf_counter()
    ends = asyncio.run(_abandon(h.target, 1000, seed=7))
    elapsed = time.perf_counter() - t0
    assert sum(ends.values()) == 1000
    assert set(ends) <= {*OK_ENDINGS, "DEADLINE_EXCEEDED (client-side artefact)"}, ends
    assert ends.get("CANCELLED", 0) > 100 and ends.get("DEADLINE_EXCEEDED", 0) > 100, ends
    h.wait_for(
        lambda: (
            h.cluster.used_blocks == 0
            and not h.cluster.running
            and h.server.dispatcher.inflight == 0
        ),
        timeout=20,
    )
    assert len(h.cluster.aborted) > 200  # the router aborted what the clients abandoned
    # What the router itself answered (requests whose deadline passed before they reached a
    # handler never count): none ended INTERNAL or UNKNOWN.
    codes = _outcomes(metrics)
    assert 400 < sum(codes.values()) <= 1000, codes
    assert set(codes) <= OK_ENDINGS, codes
    # The server is fine afterwards: a full request completes.
    req = gpb.GenerateRequest(text="Hi", sampling=gpb.SamplingParams(max_tokens=10))
    assert sum(len(m.token_ids) for m in h.stub().Generate(req, timeout=10)) == 10
    print(f"1000 abandoned requests in {elapsed:.1f}s: {ends}")


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_overload_at_ten_times_capacity(fault_router: Make, fault_tokenizer: Tokenizer) -> None:
    capacity, interval, out_len = 8, 0.01, 20
    h = fault_router(
        fake_config=fakes.FakeClusterConfig(
            num_blocks=4096, max_running=capacity, token_interval_s=interval
        ),
        script=reply_script(fault_tokenizer, repeat=4),
    )
    cfg = BenchConfig(
        Connection(h.target, timeout_s=30), concurrency=10 * capacity, progress_interval_s=0
    )
    rss: list[float] = []
    waves = []
    for wave in range(4):
        reqs = synthetic_requests(
            10 * capacity, LengthSpec(4, 4), LengthSpec(out_len, out_len), None, seed=wave
        )
        results, _ = asyncio.run(run_bench(cfg, reqs))
        waves.append(results)
        h.wait_for(lambda: h.cluster.used_blocks == 0 and not h.cluster.running, timeout=10)
        rss.append(_rss_mib())
    for results in waves:
        ok = [r for r in results if r.ok]
        rejected = [r for r in results if not r.ok]
        assert {r.code for r in rejected} == {"RESOURCE_EXHAUSTED"}
        assert capacity <= len(ok) < len(results) / 2  # most are refused, capacity is used
        # Admitted requests are unharmed by the storm: every token. (How fast refusals come back
        # and the admitted streams' TTFT/TBT: tests/bench/bench_overload.py.)
        assert all(r.output_tokens == out_len for r in ok)
    # Memory stays bounded: later waves do not grow the process (first wave warms up).
    assert max(rss[1:]) - rss[1] < 32, rss


class _Server:
    """testkit.fault_server in a subprocess on a fixed port."""

    def __init__(self, model_dir: Path, port: int, interval: float) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testkit.fault_server",
                str(model_dir),
                str(port),
                str(interval),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=TESTS,
        )
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:  # bounded: the process exits if startup fails
            lines.append(line)
            if re.search(r"listening on 127\.0\.0\.1:\d+", line):
                return
        raise AssertionError("server did not start:\n" + "".join(lines))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def test_router_killed_mid_stream_then_restarted(fault_model_dir: Path) -> None:
    port = free_port()
    server = _Server(fault_model_dir, port, interval=0.05)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = generation_pb2_grpc.GenerationStub(channel)
        req = gpb.GenerateRequest(text="Hi", sampling=gpb.SamplingParams(max_tokens=60))
        streams = [stub.Generate(req, timeout=60) for _ in range(8)]
        for s in streams:
            next(s)  # each one is streaming
        server.kill()
        t0 = time.perf_counter()
        for s in streams:
            with pytest.raises(grpc.RpcError) as info:
                for _ in s:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.perf_counter() - t0 < 5  # they end at once, never hang to the deadline
        # Back on the same port: the same client channel is served again.
        server = _Server(fault_model_dir, port, interval=0.0)
        short = gpb.GenerateRequest(text="Hi", sampling=gpb.SamplingParams(max_tokens=5))
        msgs = list(stub.Generate(short, timeout=30, wait_for_ready=True))
        assert sum(len(m.token_ids) for m in msgs) == 5 and msgs[-1].finish_reason == "length"
        channel.close()
    finally:
        server.kill()

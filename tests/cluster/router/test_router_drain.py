"""SIGTERM to a serving process: NOT_SERVING, UNAVAILABLE for new work, in-flight streams end."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from testkit import TESTS
from testkit.router_harness import eventually

from batonserve.proto import generation_pb2 as pb
from batonserve.proto import generation_pb2_grpc


class Served:
    """testkit.fake_server running in a subprocess."""

    def __init__(self, model_dir: Path, grace_s: float, interval_s: float) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testkit.fake_server",
                str(model_dir),
                str(grace_s),
                str(interval_s),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=TESTS,
        )
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # bounded: the process exits if startup fails
            self.lines.append(line)
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.target = f"127.0.0.1:{m.group(1)}"
                break
        else:
            raise AssertionError("server did not start:\n" + "".join(self.lines))
        self.channel = grpc.insecure_channel(self.target)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def health(self, service: str) -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def finish(self, timeout: float = 20) -> str:
        """Wait for exit; all output."""
        out, _ = self.proc.communicate(timeout=timeout)
        self.channel.close()
        return "".join(self.lines) + out


@pytest.fixture
def served(model_dir: Path) -> Iterator[list[Served]]:
    """Servers started by a test; killed if the test left one running."""
    made: list[Served] = []
    yield made
    for s in made:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


def _stream_in_thread(
    s: Served, max_tokens: int
) -> tuple[threading.Thread, list[pb.GenerateResponse], list[BaseException]]:
    got: list[pb.GenerateResponse] = []
    errors: list[BaseException] = []

    def run() -> None:
        req = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=max_tokens))
        try:
            for msg in s.stub.Generate(req, timeout=30):
                got.append(msg)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    eventually(lambda: len(got) >= 2, timeout=10)
    return t, got, errors


def test_sigterm_drains_in_flight_streams(model_dir: Path, served: list[Served]) -> None:
    s = Served(model_dir, grace_s=20, interval_s=0.04)
    served.append(s)
    assert s.health("batonserve.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
    thread, got, errors = _stream_in_thread(s, max_tokens=40)  # about 1.6 s of tokens
    s.proc.send_signal(signal.SIGTERM)
    eventually(lambda: s.health("") == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        list(s.stub.Generate(pb.GenerateRequest(text="late"), timeout=5))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    thread.join(30)
    assert not errors, errors
    assert sum(len(m.token_ids) for m in got) == 40  # the in-flight stream finished whole
    assert got[-1].finish_reason == "length"
    out = s.finish()
    assert s.proc.returncode == 0, out
    assert "draining: 1 request(s) in flight" in out and "drained" in out
    assert "fake cluster: shut_down=True used_blocks=0" in out


def test_grace_period_over_aborts_the_rest(model_dir: Path, served: list[Served]) -> None:
    s = Served(model_dir, grace_s=0.3, interval_s=0.05)
    served.append(s)
    thread, got, errors = _stream_in_thread(s, max_tokens=60)  # 3 s: longer than the grace
    s.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    assert not errors, errors
    assert got[-1].finish_reason == "abort"
    assert sum(len(m.token_ids) for m in got) < 60
    out = s.finish()
    assert s.proc.returncode == 0, out
    assert "grace period over" in out
    assert "fake cluster: shut_down=True used_blocks=0" in out

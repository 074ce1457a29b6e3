"""The README's main job for real: `batonserve serve` on the demo model, called over gRPC, then SIGTERM.

One local Ray instance on 127.0.0.1 with one prefill and one decode worker (disaggregated), the
router and the metrics endpoint on free ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

PROMPT = "def main("
CONFIG = """
model: demo
ray:
  include_dashboard: false
router:
  port: 0
  metrics_port: 0
  grace_period_s: 10
"""


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batonserve.cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )


class Server:
    """`batonserve serve` in a subprocess; its stdout lines collected by a thread."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batonserve.cluster.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cfg = tmp_path_factory.mktemp("serve") / "config.yaml"
    cfg.write_text(CONFIG)
    s = Server(cfg)
    try:
        s.wait_for(r"batonserve: ready", timeout=240)
        yield s
    finally:
        if s.proc.poll() is None:
            s.proc.kill()  # only if the SIGTERM test did not run or failed
            s.proc.wait(30)


def _ports(server: Server) -> tuple[str, str]:
    grpc_port = server.wait_for(r"router listening on 127\.0\.0\.1:(\d+)", 5).group(1)
    metrics = server.wait_for(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", 5).group(1)
    return f"127.0.0.1:{grpc_port}", metrics


def test_streamed_greedy_output_equals_offline_engine(server: Server) -> None:
    target, metrics_url = _ports(server)
    remote = _cli("generate", "--target", target, "--max-tokens", "12", "--json", PROMPT)
    assert remote.returncode == 0, remote.stderr
    offline = _cli(
        "generate", "--offline", "--model", "demo", "--max-tokens", "12", "--json", PROMPT
    )
    assert offline.returncode == 0, offline.stderr
    got, want = json.loads(remote.stdout), json.loads(offline.stdout)
    assert got["token_ids"] == want["token_ids"] and len(want["token_ids"]) > 0
    assert got["text"] == want["text"]

    status = _cli("status", "--target", target)
    assert status.returncode == 0, status.stderr
    assert "prefill-0" in status.stdout and "decode-0" in status.stdout

    body = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    ok = [
        ln
        for ln in body.splitlines()
        if ln.startswith("batonserve_requests_total{") and 'code="OK"' in ln
    ]
    assert sum(float(ln.rsplit(" ", 1)[1]) for ln in ok) == 1.0, ok
    assert "batonserve_kv_cache_usage_ratio{" in body and 'worker="decode-0"' in body


def test_sigterm_shuts_down_cleanly(server: Server) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(90) == 0
    server._reader.join(10)
    assert any("stopped" in ln for ln in server.lines), "\n".join(server.lines)

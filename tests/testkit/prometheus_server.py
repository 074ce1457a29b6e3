"""A real Prometheus server (Debian's `prometheus`, installed by tests/install-tools.sh) for tests.

It runs on 127.0.0.1 with a temporary config and storage dir and scrapes one target every second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from testkit.ports import free_port

DEADLINE_S = 20.0  # for Prometheus to start, and to ingest the final scrape


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


class PrometheusServer:
    """A prometheus server process on 127.0.0.1 with a temp config and storage dir."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: batonserve\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
        )
        self.log = tmp / "prometheus.log"
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed: run tests/install-tools.sh"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """Instant query over the HTTP API: [(labels, value)]."""
        q = urllib.parse.urlencode({"query": promql})
        body = json.loads(get(f"http://127.0.0.1:{self.port}/api/v1/query?{q}"))
        assert body["status"] == "success", body
        return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]

    def scalar(self, promql: str) -> float | None:
        """The single value of a query, or None when it has no result yet."""
        res = self.query(promql)
        assert len(res) <= 1, res
        return res[0][1] if res else None

    def wait_for(self, promql: str, want: float) -> None:
        """Poll until the query returns `want` (the last scrape may still be in flight)."""
        deadline = time.monotonic() + DEADLINE_S
        got = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                got = self.scalar(promql)
            except OSError:
                got = None  # not listening yet
            if got == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"{promql} = {got}, want {want}\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the process we started, by its pid."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

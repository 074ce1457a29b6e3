"""`batonserve` as a user runs it: the CLI in a subprocess, and `serve` with its output collected."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
QUIET = """
model: demo
ray:
  include_dashboard: false
router:
  port: 0
  http_port: 0
  metrics_port: 0
  grace_period_s: 10
"""


def serve_config(folder: Path, extra: str = "", ray: str = "") -> str:
    """A config file for a test server: the demo model, no dashboard, every port a free one."""
    path = folder / "config.yaml"
    path.write_text(QUIET.replace("ray:\n", "ray:\n" + ray) + extra)
    return str(path)


CLI = [sys.executable, "-m", "batonserve.cluster.cli"]


def on_cpus(n: int) -> Callable[[], None] | None:
    """A preexec_fn confining the child to `n` CPUs (a 2-core machine on a bigger one)."""
    cpus = sorted(os.sched_getaffinity(0))
    return None if len(cpus) <= n else lambda: os.sched_setaffinity(0, cpus[:n])


def cli(*args: str, timeout: float = 120, cpus: int = 0) -> subprocess.CompletedProcess[str]:
    """Run one `batonserve` subcommand to its end."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=Path(__file__).parent,  # not the repo root: its folders must not shadow packages
        preexec_fn=on_cpus(cpus) if cpus else None,
    )


class Server:
    """`batonserve serve` in a subprocess; its stdout lines collected by a thread. `python` picks
    the install (another virtualenv's interpreter serves that install's code)."""

    def __init__(self, args: Sequence[str], cpus: int = 0, python: str = sys.executable) -> None:
        self.proc = subprocess.Popen(
            [python, *CLI[1:], "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=ENV,
            cwd=Path(__file__).parent,
            preexec_fn=on_cpus(cpus) if cpus else None,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first output line matching `pattern`; fails with the whole output otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM, then the exit code (killed if it does not stop in time)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise
        finally:
            self._reader.join(10)


@contextlib.contextmanager
def serving(args: Sequence[str], ready_timeout: float = 300) -> Iterator[Server]:
    """A ready server; on exit it must stop cleanly on SIGTERM (killed if it never got there)."""
    s = Server(args)
    try:
        s.wait_for(r"batonserve: ready", timeout=ready_timeout)
        yield s
        assert s.stop() == 0, "\n".join(s.lines)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(30)

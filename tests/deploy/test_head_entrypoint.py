"""The head pod's entrypoint supervises Ray and the router: run for real with stand-in binaries."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from chart_helpers import CHART

SCRIPT = CHART / "files" / "head-entrypoint.sh"

# Stand-ins for `ray` and `batonserve` that log what happens to them in order.
FAKE_RAY = r"""#!/bin/bash
log="$FAKE_STATE/log"
case "$1" in
  start)
    echo "ray:start $*" >> "$log"
    if [ "$FAKE_RAY_MODE" = die ]; then exit 7; fi
    trap 'echo ray:term >> "$log"; exit 0' TERM
    if [ "$FAKE_RAY_MODE" != hang ]; then touch "$FAKE_STATE/gcs-up"; fi
    for _ in $(seq 600); do sleep 0.05; done
    exit 0 ;;
  health-check)
    [ -e "$FAKE_STATE/gcs-up" ] ;;
  *) exit 2 ;;
esac
"""

FAKE_BATONSERVE = r"""#!/bin/bash
log="$FAKE_STATE/log"
echo "serve:start $*" >> "$log"
if [ "$FAKE_SERVE_MODE" = exit3 ]; then sleep 0.2; exit 3; fi
trap 'echo serve:term >> "$log"; exit 0' TERM
for _ in $(seq 600); do sleep 0.05; done
"""


def _start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ray", FAKE_RAY), ("batonserve", FAKE_BATONSERVE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "FAKE_STATE": str(tmp_path),
        "KUBERAY_GEN_RAY_START_CMD": "ray start --head --resources='{\"a\": 1}' --block",
        "FAKE_RAY_MODE": "ok",
        "FAKE_SERVE_MODE": "run",
    }
    full_env.update(env)
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "/etc/batonserve/config.yaml"],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, tmp_path / "log"


def _log(path: Path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def _wait_for(path: Path, line_prefix: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(line.startswith(line_prefix) for line in _log(path)):
            return
        time.sleep(0.05)
    pytest.fail(f"{line_prefix!r} never happened; log: {_log(path)}")


def test_router_exit_stops_ray_and_becomes_the_pod_status(tmp_path: Path) -> None:
    proc, log = _start(tmp_path, FAKE_SERVE_MODE="exit3")
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 3, err
    lines = _log(log)
    # KubeRay's quoting survives (eval), the router gets the config, Ray is stopped after it.
    assert lines[0] == 'ray:start start --head --resources={"a": 1} --block'
    assert lines[1] == "serve:start serve --config /etc/batonserve/config.yaml"
    assert lines[-1] == "ray:term"
    assert "batonserve serve exited with 3" in err


def test_sigterm_drains_router_before_stopping_ray(tmp_path: Path) -> None:
    proc, log = _start(tmp_path)
    _wait_for(log, "serve:start")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=15)
    assert proc.returncode == 143
    lines = _log(log)
    assert lines.index("serve:term") < lines.index("ray:term")


def test_ray_dying_first_never_starts_the_router(tmp_path: Path) -> None:
    proc, log = _start(tmp_path, FAKE_RAY_MODE="die")
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 7
    assert not any(line.startswith("serve:") for line in _log(log))
    assert "ray start exited with 7 before the GCS came up" in err


def test_gcs_wait_is_bounded(tmp_path: Path) -> None:
    proc, log = _start(tmp_path, FAKE_RAY_MODE="hang", BATONSERVE_RAY_WAIT_S="1")
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 1
    assert "not up after 1s" in err
    assert _log(log)[-1] == "ray:term"


def test_refuses_to_run_outside_kuberay(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KUBERAY_GEN_RAY_START_CMD"}
    r = subprocess.run(
        ["bash", str(SCRIPT), "/x.yaml"], env=env, capture_output=True, text=True, timeout=15
    )
    assert r.returncode == 1
    assert "KUBERAY_GEN_RAY_START_CMD is not set" in r.stderr

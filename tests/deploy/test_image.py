"""The container images: their Dockerfiles agree with the chart, and the CPU image builds and runs.

The build test uses what `tests/install-tools.sh` prepares under `.tools/image/`: podman and runc,
a Debian base image made with debootstrap (no registry is reachable) and a wheelhouse of the
image's Python dependencies, so the build itself is offline. It builds from the repository root
with the repository's `.dockerignore`, as a user would, and runs the image the way the chart's
restricted security context runs it.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
VALUES = ROOT / "deploy" / "helm" / "batonserve" / "values.yaml"
IMAGE_DIR = ROOT / ".tools" / "image"
WHEELS = IMAGE_DIR / "wheels"
BASE_IMAGE = "localhost/batonserve-base:bookworm"
TAG = "localhost/batonserve:test"
OPENAI_PORT = 8000  # the router's OpenAI HTTP default
BUILD_TIMEOUT_S = 1200  # a cold build (no cached layers) takes about 5 minutes on 2 cores
RUN_TIMEOUT_S = 300


def _args(dockerfile: Path) -> dict[str, str]:
    """`ARG NAME=default` lines of a Dockerfile, quotes stripped."""
    found = re.findall(r"^ARG (\w+)=(.*)$", dockerfile.read_text(), flags=re.M)
    return {name: value.strip().strip('"') for name, value in found}


def _instruction(dockerfile: Path, name: str) -> list[str]:
    """The arguments of every `NAME ...` instruction line."""
    return re.findall(rf"^{name} (.*)$", dockerfile.read_text(), flags=re.M)


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_fits_the_chart(flavor: str) -> None:
    """User, ports, Ray version and model cache path are the ones the chart's values use."""
    dockerfile = DOCKERFILES[flavor]
    values = yaml.safe_load(VALUES.read_text())
    k8s, router = values["kubernetes"], values["router"]
    args = _args(dockerfile)
    assert int(args["APP_UID"]) == k8s["security_context"]["run_as_user"] != 0
    assert int(args["APP_GID"]) == k8s["security_context"]["run_as_group"]
    assert _instruction(dockerfile, "USER") == ["${APP_UID}:${APP_GID}"]  # numeric: runAsNonRoot
    assert args["RAY_VERSION"] == k8s["ray_version"]
    text = dockerfile.read_text()
    assert f"-m 2775 {k8s['model_cache']['mount_path']}" in text
    exposed = {int(p) for line in _instruction(dockerfile, "EXPOSE") for p in line.split()}
    wanted = {OPENAI_PORT, router["port"], router["metrics_port"], 6379, 8265, 10001, 8080}
    wanted |= {router[key] for key in ("http_port", "openai_port") if key in router}
    assert wanted <= exposed
    assert _instruction(dockerfile, "ENTRYPOINT") == ['["batonserve"]']
    # Weights come from the package (bundled demo models) or the volume, never the network.
    assert not re.search(r"huggingface-cli|hf download|snapshot_download|wget http|curl ", text)


def test_dockerignore_keeps_the_build_inputs() -> None:
    """Every path the Dockerfiles COPY or bind-mount is re-included by the .dockerignore."""
    kept = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for dockerfile in DOCKERFILES.values():
        text = dockerfile.read_text()
        sources = [s for line in _instruction(dockerfile, "COPY") for s in line.split()[:-1]]
        sources += re.findall(r"--mount=type=bind,source=([^,]+)", text)
        for source in sources:
            assert any(source == k or source.startswith(k + "/") for k in kept), source


def _engine() -> list[str]:
    """podman on the storage under .tools/image (its layer cache makes repeat builds fast)."""
    return [
        "podman",
        "--root",
        str(IMAGE_DIR / "containers"),
        "--runroot",
        str(IMAGE_DIR / "run"),
    ]


def _ulimits() -> list[str]:
    """Limits at or below this process's: a sandbox without CAP_SYS_RESOURCE refuses podman's
    defaults (it raises nofile and nproc), even to equal values."""
    out = []
    for name, limit in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = resource.getrlimit(limit)
        n = min(4096, *(v for v in (soft, hard) if v != resource.RLIM_INFINITY))
        out += ["--ulimit", f"{name}={n}:{n}"]
    return out


def _require_builder() -> None:
    """Skip where no image can be built by design; fail where install-tools.sh was not run."""
    if os.environ.get("BATONSERVE_SKIP_IMAGE") == "1":
        pytest.skip("BATONSERVE_SKIP_IMAGE=1")
    if os.geteuid() != 0:
        pytest.skip("the image test builds with rootful podman and needs root")
    missing = [tool for tool in ("podman", "runc") if shutil.which(tool) is None]
    if missing or not (WHEELS / "requirements.txt").exists():
        pytest.fail(
            f"image build prerequisites missing ({', '.join(missing) or WHEELS}): "
            "run `bash tests/install-tools.sh` as root first",
            pytrace=False,
        )
    import tomllib  # Python 3.11+, as the image (and CI)

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = set((WHEELS / "requirements.txt").read_text().splitlines())
    if stale := [dep for dep in deps if dep not in listed]:
        pytest.fail(
            f"the wheelhouse predates pyproject.toml ({', '.join(stale)}): "
            "run `bash tests/install-tools.sh` again",
            pytrace=False,
        )
    probe = subprocess.run(
        [*_engine(), "image", "exists", BASE_IMAGE], capture_output=True, timeout=60
    )
    if probe.returncode != 0:
        pytest.fail(f"{BASE_IMAGE} is missing: run `bash tests/install-tools.sh`", pytrace=False)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT_S + 2 * RUN_TIMEOUT_S)
def test_cpu_image_builds_and_generates_as_the_chart_runs_it() -> None:
    """Build Dockerfile.cpu offline, then `batonserve generate --offline` in it as uid 1000 on a
    read-only root with no capabilities and no network: it prints the demo model's continuation."""
    _require_builder()
    build = subprocess.run(
        [
            *_engine(),
            "build",
            "--isolation=chroot",  # no OCI runtime or cgroups needed to build
            "--layers",
            "--pull=never",
            "-f",
            str(DOCKERFILES["cpu"]),
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg",
            "TORCH_INDEX_URL=",
            "--build-arg",
            "PIP_EXTRA_ARGS=--no-index --find-links /tmp/test-wheels",
            "-v",
            f"{WHEELS}:/tmp/test-wheels:ro",
            "-t",
            TAG,
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-4000:]
    # Older builds of the tag become dangling: drop them so the storage stays bounded (those of
    # the last hour stay, so that a build running beside this one keeps its fresh layers).
    subprocess.run(
        [*_engine(), "image", "prune", "-f", "--filter", "until=1h"],
        capture_output=True,
        timeout=120,
    )

    inspect = subprocess.run(
        [*_engine(), "image", "inspect", TAG], capture_output=True, text=True, timeout=60
    )
    assert inspect.returncode == 0, inspect.stderr
    config = json.loads(inspect.stdout)[0]["Config"]
    assert config["User"] == "1000:100"
    assert config["Entrypoint"] == ["batonserve"]
    assert {"8000/tcp", "8001/tcp", "9400/tcp"} <= set(config["ExposedPorts"])

    # The chart's securityContext and volumes: uid 1000 / gid 100, read-only root, all
    # capabilities dropped, no privilege escalation, HOME=/tmp on a writable /tmp.
    run = [
        *_engine(),
        "run",
        "--rm",
        "--runtime=runc",
        "--pull=never",
        "--network=none",
        "--read-only",
        "--tmpfs=/tmp",
        "--user=1000:100",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--env=HOME=/tmp",
        *_ulimits(),
    ]
    gen = subprocess.run(
        [
            *run,
            TAG,
            "generate",
            "--offline",
            "--json",
            "--max-tokens=12",
            "--ignore-eos",
            "def fibonacci(n):",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert gen.returncode == 0, gen.stdout[-3000:] + gen.stderr[-6000:]
    out = json.loads(gen.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 12 and out["finish_reason"] == "length"
    assert out["text"].strip(), out

    # KubeRay starts worker pods with `bash -lc "... ray start ..."`: Debian's /etc/profile resets
    # PATH, so the image's profile.d entry must bring ray back; the user owns nothing but /models.
    shell = subprocess.run(
        [
            *run,
            "--entrypoint=/bin/bash",
            TAG,
            "-lc",
            "id -u; id -g; command -v ray; stat -c '%u:%g %a' /models; touch /models/x",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    lines = shell.stdout.split()
    assert lines[:3] == ["1000", "100", "/opt/batonserve/bin/ray"], shell.stdout + shell.stderr
    assert lines[3:5] == ["1000:100", "2775"], shell.stdout
    assert "Read-only file system" in shell.stderr  # the root (and /models without a volume)

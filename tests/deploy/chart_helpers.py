"""Helpers for the chart tests: the helm binary, `helm template` rendered and parsed."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "batonserve"
VALUES_DIR = Path(__file__).resolve().parent / "values"
HELM = ROOT / ".tools" / "bin" / "helm"
KUBE_VERSION = "1.35.0"  # what `helm template` assumes (Capabilities.KubeVersion)

# name -> values files (beyond the chart's values.yaml); the scenarios of the issue.
SCENARIOS: dict[str, list[Path]] = {
    "default": [],
    "heterogeneous": [VALUES_DIR / "heterogeneous.yaml"],
    "monitoring": [VALUES_DIR / "monitoring.yaml"],
    "model-cache": [VALUES_DIR / "model-cache.yaml"],
    "tensor-parallel-70b": [VALUES_DIR / "tensor-parallel-70b.yaml"],
}

Docs = list[dict[str, Any]]


def helm_path() -> Path:
    """The helm binary installed by tests/install-tools.sh; a clear failure when it is missing."""
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `bash tests/install-tools.sh` first", pytrace=False)
    return HELM


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with a bounded time; the caller checks the return code."""
    return subprocess.run(
        [str(helm_path()), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def template(
    values: list[Path] | None = None, sets: list[str] | None = None, release: str = "rel"
) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart with values files and --set flags."""
    args = ["template", release, str(CHART), "--namespace", "serving"]
    args += ["--kube-version", KUBE_VERSION]
    for v in values or []:
        args += ["-f", str(v)]
    for s in sets or []:
        args += ["--set", s]
    return helm(*args)


def parse(text: str) -> Docs:
    """Every non-empty YAML document of a rendered manifest."""
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: Docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """Documents of one kind (and name, if given)."""
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]

"""The repository root never shadows another distribution: `kernels`, `cluster`, `workers` and
`proto` are PyPI names, and the project is imported only as `batonserve.*`."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kernels", "cluster", "workers", "proto"])
def test_top_level_folders_are_not_importable_here(name: str) -> None:
    spec = importlib.util.find_spec(name)
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    # The repository's own folder, not a distribution installed in a virtualenv inside it.
    assert origin is None or (REPO / name) not in origin.parents, f"{name} imports from {origin}"


def test_transformers_runs_under_python_m_pytest_from_the_root() -> None:
    """The README's `python3 -m pytest` from the root puts the root on sys.path; conftest drops it."""
    probe = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/import_probe.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stdout[-3000:] + probe.stderr[-2000:]
    assert "1 passed" in probe.stdout, probe.stdout[-3000:]

"""`helm lint --strict` passes for the chart's defaults and for every scenario's values."""

from __future__ import annotations

from pathlib import Path

import pytest
from chart_helpers import CHART, KUBE_VERSION, SCENARIOS, helm


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(scenario: str) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    for v in SCENARIOS[scenario]:
        args += ["-f", str(v)]
    r = helm(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout
    # --strict turns warnings into failures; none may appear.
    assert "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


def test_every_values_file_is_a_scenario() -> None:
    """A values file added to tests/deploy/values/ gets linted and rendered too."""
    files = {p for paths in SCENARIOS.values() for p in paths}
    on_disk = set((Path(__file__).parent / "values").glob("*.yaml"))
    assert on_disk == files

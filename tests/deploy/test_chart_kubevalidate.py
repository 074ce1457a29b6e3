"""Rendered core objects validate offline against a current Kubernetes version's OpenAPI schemas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
from chart_helpers import SCENARIOS, Docs

# Kinds kubernetes-validate has schemas for; CRDs (RayCluster, ServiceMonitor, PodMonitor) are not
# among them, so the RayCluster's pod templates are checked as core PodTemplates instead.
CORE = {"ConfigMap", "Service", "ServiceAccount", "PersistentVolumeClaim", "PodDisruptionBudget"}
CORE |= {"NetworkPolicy"}
VERSIONS = ["1.33.0", "1.35.0"]


def _pod_templates(rc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rc["spec"]
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return [
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{rc['metadata']['name']}-{name}"},
            "template": t,
        }
        for name, t in templates
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_core_objects_validate(
    rendered: Callable[[str], Docs], scenario: str, version: str
) -> None:
    docs = rendered(scenario)
    checked = []
    for doc in docs:
        if doc["kind"] == "RayCluster":
            objs = _pod_templates(doc)
        elif doc["kind"] in CORE:
            objs = [doc]
        else:
            assert doc["kind"] in {"ServiceMonitor", "PodMonitor"}, doc["kind"]
            continue
        for obj in objs:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {e.message} at {e.path}")
            checked.append(obj["kind"])
    assert "PodTemplate" in checked and "Service" in checked and "ConfigMap" in checked


def test_validator_catches_a_bad_object() -> None:
    """The check has teeth: a misspelt field and a wrong type are both reported."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"name": "grpc", "port": "8001", "appProtocoll": "grpc"}]},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)

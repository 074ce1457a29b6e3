"""values.yaml is a ServeConfig; values.schema.json (generated from it) rejects bad values clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema  # installed with kubernetes-validate
import pytest
import yaml
from chart_helpers import CHART, SCENARIOS, template

from batonserve.cluster.config import ConfigError, load_config
from batonserve.cluster.kube_config import KubernetesConfig
from batonserve.cluster.kube_schema import render, values_schema


def test_committed_schema_is_generated_from_the_dataclasses() -> None:
    committed = (CHART / "values.schema.json").read_text()
    assert committed == render(), (
        "values.schema.json is stale: python -m batonserve.cluster.kube_schema "
        "> deploy/helm/batonserve/values.schema.json"
    )
    schema = values_schema()
    assert schema["additionalProperties"] is False
    pool = schema["properties"]["pools"]["items"]
    assert pool["properties"]["role"]["enum"] == ["prefill", "decode", "mixed"]
    assert pool["required"] == ["name", "role"] and pool["additionalProperties"] is False


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_values_files_load_as_serve_config(scenario: str) -> None:
    load_config(CHART / "values.yaml")
    for f in SCENARIOS[scenario]:
        cfg = load_config(f)
        assert cfg.pools  # a ServeConfig, pools and all


def _keys(obj: Any, prefix: str = "") -> set[str]:
    if not isinstance(obj, dict):
        return set()
    out = set()
    for k, v in obj.items():
        out.add(prefix + k)
        out |= _keys(v, f"{prefix}{k}.")
    return out


def test_values_yaml_spells_out_every_kubernetes_setting() -> None:
    """Templates read .Values.kubernetes.* directly, so every field must have a default there."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    expected = {
        f"kubernetes.{k}"
        for k in _keys(dataclasses.asdict(KubernetesConfig()))
        if not any(k.startswith(p) for p in _free_maps())
    }
    have = _keys(values)
    assert expected <= have, sorted(expected - have)


def _free_maps() -> list[str]:
    # Maps whose keys are user data (labels, selectors, resources), not settings.
    return [
        "grafana_dashboard.labels.",
        "network_policy.metrics_namespace_selector.",
        "head.resources.requests.",
        "head.resources.limits.",
    ]


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("role enum", {"pools": [{"name": "p", "role": "encode"}]}, "/pools/0/role"),
    ("unknown pool key", {"pools": [{"name": "p", "role": "decode", "gpus": 1}]}, "'gpus'"),
    ("unknown top key", {"modle": "x"}, "'modle'"),
    ("unknown k8s key", {"kubernetes": {"imagePullPolicy": "Always"}}, "'imagePullPolicy'"),
    ("negative replicas", {"pools": [{"name": "p", "role": "decode", "replicas": -1}]}, "minimum"),
    ("replicas type", {"pools": [{"name": "p", "role": "decode", "replicas": "2"}]}, "/replicas"),
    ("pool name", {"pools": [{"name": "Decode_A", "role": "decode"}]}, "/pools/0/name"),
    ("no pools", {"pools": []}, "/pools"),
    ("pull policy", {"kubernetes": {"image": {"pull_policy": "Sometimes"}}}, "pull_policy"),
    ("root user", {"kubernetes": {"security_context": {"run_as_user": 0}}}, "run_as_user"),
    ("port range", {"router": {"port": 70000}}, "/router/port"),
    ("bool type", {"kubernetes": {"model_cache": {"enabled": "yes"}}}, "enabled"),
]


def _write(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(("case", "values", "where"), BAD, ids=[b[0] for b in BAD])
def test_schema_rejects_bad_values(
    tmp_path: Path, case: str, values: dict[str, Any], where: str
) -> None:
    r = template([_write(tmp_path, values)])
    assert r.returncode != 0, f"{case}: helm accepted it"
    assert "values don't meet the specifications of the schema" in r.stderr
    assert where in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("case", "values", "where"),
    [b for b in BAD if b[0] not in {"pool name", "no pools", "root user", "port range"}],
    ids=[b[0] for b in BAD if b[0] not in {"pool name", "no pools", "root user", "port range"}],
)
def test_python_schema_rejects_the_same(
    tmp_path: Path, case: str, values: dict[str, Any], where: str
) -> None:
    """Type, enum and unknown-key errors are the Python schema's too (the stricter Kubernetes-only
    rules - DNS names, non-root ids, port ranges - live in the chart)."""
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, values))


TEMPLATE_CHECKS: list[tuple[str, dict[str, Any], str]] = [
    ("loopback host", {"router": {"host": "127.0.0.1"}}, "router.host"),
    ("loopback metrics", {"router": {"metrics_host": "localhost"}}, "router.metrics_host"),
    ("local ray", {"ray": {"address": ""}}, "ray.address"),
    ("ray port", {"router": {"port": 8265}}, "router.port: 8265 is a port Ray uses"),
    ("same ports", {"router": {"port": 9000, "metrics_port": 9000}}, "must differ"),
    ("same http port", {"router": {"http_port": 8001}}, "router.http_port: must differ"),
    ("ray http port", {"router": {"http_port": 8080}}, "router.http_port: 8080 is a port Ray"),
    (
        "above max",
        {"pools": [{"name": "d", "role": "decode", "replicas": 5, "max_replicas": 2}]},
        "pools[0] (d).replicas: 5 is above max_replicas 2",
    ),
    (
        "below min",
        {"pools": [{"name": "d", "role": "decode", "replicas": 1, "min_replicas": 2}]},
        "pools[0] (d).min_replicas: 2 is above replicas 1",
    ),
]


@pytest.mark.parametrize(
    ("case", "values", "message"), TEMPLATE_CHECKS, ids=[c[0] for c in TEMPLATE_CHECKS]
)
def test_chart_rejects_what_kubernetes_cannot_run(
    tmp_path: Path, case: str, values: dict[str, Any], message: str
) -> None:
    r = template([_write(tmp_path, values)])
    assert r.returncode != 0, f"{case}: helm accepted it"
    assert message in r.stderr, r.stderr


def test_schema_is_valid_draft7() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert not list(jsonschema.Draft7Validator(schema).iter_errors(values))

"""The Grafana dashboard and docs/operations.md name only real series, and document all of them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from batonserve.cluster.metrics import build_series

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy/helm/batonserve/dashboards/batonserve.json"
SERIES_REF = re.compile(r"\bbatonserve_[a-z0-9_]+")


def _declared() -> set[str]:
    names = set()
    for spec in build_series(8192):
        names.add(spec.name)
        if spec.kind == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
    return names


def test_dashboard_structure_and_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "batonserve"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in dash["panels"]}
    for wanted in (
        "Time to first token",
        "Inter-token latency",
        "Tokens per second",
        "Queue depth",
        "KV cache usage per worker",
        "KV handoff latency",
        "Rejections by reason",
        "Mixed-pool churn",
    ):
        assert wanted in titles, wanted
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_queries_use_declared_series_and_bucket_quantiles() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    declared = _declared()
    used = set()
    for expr in exprs:
        refs = set(SERIES_REF.findall(expr))
        assert refs, expr
        assert refs <= declared, f"unknown series in {expr}: {refs - declared}"
        used |= refs
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "rate(" in expr and "le" in expr, expr
    for histogram in (
        "batonserve_time_to_first_token_seconds_bucket",
        "batonserve_inter_token_latency_seconds_bucket",
        "batonserve_kv_handoff_seconds_bucket",
    ):
        assert histogram in used


def test_operations_doc_documents_every_series_and_names_only_real_ones() -> None:
    text = (ROOT / "docs/operations.md").read_text()
    declared = _declared()
    refs = set(SERIES_REF.findall(text))
    assert refs <= declared, f"docs name unknown series: {refs - declared}"
    for spec in build_series(8192):
        assert f"| `{spec.name}` |" in text, f"{spec.name} missing from the docs' series tables"
    assert "namespace `batonserve`" in text and "<pool>-<index>" in text

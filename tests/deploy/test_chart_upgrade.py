"""What a `helm upgrade` restarts: the pod templates of two renders compared.

KubeRay (upgradeStrategy Recreate) recreates every pod when the RayCluster spec changes, leaving
out the worker groups' replicas, minReplicas and maxReplicas. The head template carries the
config's checksum; it must leave out the pools' scale too, so a replicas-only upgrade changes no
pod template (the running controller reads the new replicas from the mounted ConfigMap), while
any other setting still changes it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import CHART, find, parse, template

FULLNAME = "rel-batonserve"


def _render(values: dict[str, Any], tmp_path: Path, name: str) -> dict[str, Any]:
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(values))
    r = template([f])
    assert r.returncode == 0, r.stderr
    docs = parse(r.stdout)
    [rc] = find(docs, "RayCluster")
    [cm] = find(docs, "ConfigMap", f"{FULLNAME}-config")
    return {"rc": rc, "config": yaml.safe_load(cm["data"]["config.yaml"])}


def _templates(rc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template (head first), without the groups' scale, as KubeRay hashes them."""
    spec = rc["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _base() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _scaled(values: dict[str, Any], replicas: list[int]) -> dict[str, Any]:
    out = copy.deepcopy(values)
    for pool, n in zip(out["pools"], replicas, strict=True):
        pool["replicas"] = n
        pool["max_replicas"] = max(n, pool.get("max_replicas", 0))
    return out


@pytest.mark.parametrize("replicas", [[2, 1], [1, 3], [4, 4]])
def test_replicas_only_upgrade_changes_no_pod_template(tmp_path: Path, replicas: list[int]) -> None:
    base = _base()
    before = _render(base, tmp_path, "before")
    after = _render(_scaled(base, replicas), tmp_path, "after")
    assert _templates(after["rc"]) == _templates(before["rc"])  # no pod is recreated
    groups = after["rc"]["spec"]["workerGroupSpecs"]
    assert [g["replicas"] for g in groups] == replicas  # KubeRay adds or removes workers
    # ... and the mounted config carries the new replicas to the running controller.
    assert [p["replicas"] for p in after["config"]["pools"]] == replicas


@pytest.mark.parametrize(
    "path,value",
    [
        (("engine", "max_num_seqs"), 7),
        (("scheduler", "conditional_disaggregation"), False),
        (("pools", 0, "num_cpus"), 3.0),
        (("model",), "/models/other"),
    ],
)
def test_any_other_change_changes_the_head_template(
    tmp_path: Path, path: tuple[Any, ...], value: Any
) -> None:
    base = _base()
    changed = copy.deepcopy(base)
    node: Any = changed
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    before = _render(base, tmp_path, "before")
    after = _render(changed, tmp_path, "after")
    ann = "checksum/config"
    head_before = before["rc"]["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]
    head_after = after["rc"]["spec"]["headGroupSpec"]["template"]["metadata"]["annotations"]
    assert head_before[ann] != head_after[ann], path  # the pods restart with the new config


def test_config_reaches_the_head_as_a_mounted_file(tmp_path: Path) -> None:
    """A whole-directory ConfigMap volume (no subPath): the kubelet updates the file in place."""
    rc = _render(_base(), tmp_path, "base")["rc"]
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    [mount] = [m for m in head["containers"][0]["volumeMounts"] if m["name"] == "config"]
    assert mount["mountPath"] == "/etc/batonserve" and "subPath" not in mount
    [vol] = [v for v in head["volumes"] if v["name"] == "config"]
    assert vol["configMap"]["name"] == f"{FULLNAME}-config"

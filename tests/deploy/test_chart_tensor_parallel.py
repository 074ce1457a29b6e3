"""Tensor-parallel pools: a pod holds one worker of tensor_parallel_size ranks and gets N GPUs.

The scenario is docs/deploy.md's 70B example (tests/deploy/values/tensor-parallel-70b.yaml); lint,
kubernetes-validate and the values schema run on it with the other scenarios.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import yaml
from chart_helpers import ROOT, VALUES_DIR, Docs, find, parse, template

from batonserve.cluster.cli_plan import design_yaml
from batonserve.cluster.config import load_config
from batonserve.cluster.sim.design import make_design, with_tensor_parallel

Render = Callable[[str], Docs]
VALUES = VALUES_DIR / "tensor-parallel-70b.yaml"
NODE_GPUS = 8  # the example's nodes: 8 x H100 80GB


def _groups(docs: Docs) -> dict[str, dict]:
    [rc] = find(docs, "RayCluster")
    return {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def test_docs_example_is_the_tested_values_file() -> None:
    """The values docs/deploy.md shows for a 70B model are the file these tests render."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    assert yaml.safe_load(VALUES.read_text()) in blocks


def test_tp_pool_pods_get_tensor_parallel_size_gpus(rendered: Render) -> None:
    values = yaml.safe_load(VALUES.read_text())
    groups = _groups(rendered("tensor-parallel-70b"))
    for pool in values["pools"]:
        tp = pool["tensor_parallel_size"]
        g = groups[pool["name"]]
        gpus = int(pool["num_gpus"]) * tp  # num_gpus and num_cpus are per rank
        res = _container(g)["resources"]
        assert res["limits"]["nvidia.com/gpu"] == gpus
        assert g["rayStartParams"]["num-gpus"] == str(gpus)
        cpus = int(pool["num_cpus"] * tp)
        assert g["rayStartParams"]["num-cpus"] == str(cpus)
        assert res["requests"]["cpu"] == str(cpus)
        # Whole workers per node: a TP group never straddles two nodes (STRICT_PACK).
        assert NODE_GPUS % gpus == 0
    assert groups["prefill"]["rayStartParams"]["num-gpus"] == "8"
    assert groups["decode"]["rayStartParams"]["num-gpus"] == "4"


def test_tp_size_one_keeps_a_pools_gpus(tmp_path: Path) -> None:
    """Without tensor_parallel_size (or at 1) a pod gets ceil(num_gpus) GPUs, as before."""
    for extra in ({}, {"tensor_parallel_size": 1}):
        path = tmp_path / "values.yaml"
        pool = {"name": "p", "role": "mixed", "num_gpus": 1.5, **extra}
        path.write_text(yaml.safe_dump({"pools": [pool]}))
        r = template([path])
        assert r.returncode == 0, r.stderr
        [g] = _groups(parse(r.stdout)).values()
        assert _container(g)["resources"]["limits"]["nvidia.com/gpu"] == 2
        assert g["rayStartParams"]["num-gpus"] == "2"


def test_rendered_config_carries_tensor_parallel_size(rendered: Render, tmp_path: Path) -> None:
    [cm] = find(rendered("tensor-parallel-70b"), "ConfigMap", "rel-batonserve-config")
    cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert {p["name"]: p["tensor_parallel_size"] for p in cfg["pools"]} == {
        "prefill": 8,
        "decode": 4,
    }
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    served = load_config(path)
    assert [p.tensor_parallel_size for p in served.pools] == [8, 4]


def test_plan_yaml_names_the_values_pools_and_field() -> None:
    """`batonserve plan --output` writes the pools and the field these values carry."""
    plan = yaml.safe_load(
        design_yaml(with_tensor_parallel(make_design("Splitwise-HH", 3, 2), 8, 4))
    )
    values = {p["name"]: p for p in yaml.safe_load(VALUES.read_text())["pools"]}
    for name, pool in plan["pools"].items():
        assert pool["tensor_parallel_size"] == values[name]["tensor_parallel_size"]

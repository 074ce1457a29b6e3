"""`helm template` per scenario, parsed and checked: RayCluster fields, ports, probes, security."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from chart_helpers import CHART, VALUES_DIR, Docs, find, parse, template

from batonserve.cluster.config import PoolConfig, load_config

Render = Callable[[str], Docs]
FULLNAME = "rel-batonserve"


def raycluster(docs: Docs) -> dict[str, Any]:
    [rc] = find(docs, "RayCluster")
    return rc


def pod_templates(rc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = rc["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def head_container(rc: dict[str, Any]) -> dict[str, Any]:
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_default_objects(rendered: Render) -> None:
    docs = rendered("default")
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == [
        ("ConfigMap", f"{FULLNAME}-config"),
        ("NetworkPolicy", f"{FULLNAME}-cluster"),
        ("NetworkPolicy", f"{FULLNAME}-router"),
        ("PodDisruptionBudget", f"{FULLNAME}-decode"),
        ("PodDisruptionBudget", f"{FULLNAME}-prefill"),
        ("RayCluster", FULLNAME),
        ("Service", FULLNAME),
        ("ServiceAccount", FULLNAME),
    ]  # monitoring, dashboard and model cache are off by default


def test_raycluster_required_fields(rendered: Render) -> None:
    values = load_config(CHART / "values.yaml")
    for scenario in ("default", "heterogeneous", "monitoring", "model-cache"):
        rc = raycluster(rendered(scenario))
        assert rc["apiVersion"] == "ray.io/v1"
        head = rc["spec"]["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        assert head["template"]["spec"]["containers"]
        groups = rc["spec"]["workerGroupSpecs"]
        for g in groups:
            for key in ("groupName", "replicas", "minReplicas", "maxReplicas"):
                assert key in g, (scenario, key)
            assert isinstance(g["rayStartParams"], dict)
            assert g["template"]["spec"]["containers"][0]["name"] == "ray-worker"
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    default_groups = raycluster(rendered("default"))["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in default_groups] == [p.name for p in values.pools]
    assert [g["replicas"] for g in default_groups] == [p.replicas for p in values.pools]


def test_head_runs_router_as_ray_driver(rendered: Render) -> None:
    docs = rendered("default")
    rc = raycluster(docs)
    template = rc["spec"]["headGroupSpec"]["template"]
    assert template["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    c = head_container(rc)
    assert c["command"] == [
        "/bin/bash",
        "/etc/batonserve/head-entrypoint.sh",
        "/etc/batonserve/config.yaml",
    ]
    [cm] = find(docs, "ConfigMap", f"{FULLNAME}-config")
    script = (CHART / "files" / "head-entrypoint.sh").read_text()
    assert cm["data"]["head-entrypoint.sh"].strip() == script.strip()
    assert "batonserve serve --config" in script and "KUBERAY_GEN_RAY_START_CMD" in script
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/batonserve"
    # A new config (or image) replaces the pods: the config's hash is in the head template.
    assert rc["spec"]["upgradeStrategy"] == {"type": "Recreate"}
    checksum = template["metadata"]["annotations"]["checksum/config"]
    other = raycluster(rendered("monitoring"))["spec"]["headGroupSpec"]["template"]
    assert len(checksum) == 64 and other["metadata"]["annotations"]["checksum/config"] != checksum
    # No Ray CPUs on the head: engine actors land in the worker groups.
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rendered_config_is_the_values(rendered: Render, tmp_path: Path) -> None:
    """The ConfigMap's config.yaml loads as a ServeConfig equal to the values files'."""
    for scenario, files in (
        ("default", []),
        ("heterogeneous", [VALUES_DIR / "heterogeneous.yaml"]),
        ("monitoring", [VALUES_DIR / "monitoring.yaml"]),
        ("model-cache", [VALUES_DIR / "model-cache.yaml"]),
    ):
        [cm] = find(rendered(scenario), "ConfigMap", f"{FULLNAME}-config")
        merged = yaml.safe_load((CHART / "values.yaml").read_text())
        for f in files:  # Helm's merge: maps merge, lists and scalars replace
            _merge(merged, yaml.safe_load(f.read_text()))
        rendered_cfg = yaml.safe_load(cm["data"]["config.yaml"])
        assert rendered_cfg == merged, scenario
        path = tmp_path / f"{scenario}-config.yaml"
        path.write_text(cm["data"]["config.yaml"])
        cfg = load_config(path)
        assert cfg.ray.address == "auto" and cfg.router.host == "0.0.0.0"


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def test_ports_probes_and_service(rendered: Render) -> None:
    for scenario in ("default", "monitoring"):
        docs = rendered(scenario)
        rc = raycluster(docs)
        [cm] = find(docs, "ConfigMap", f"{FULLNAME}-config")
        cfg = yaml.safe_load(cm["data"]["config.yaml"])
        port, metrics_port = cfg["router"]["port"], cfg["router"]["metrics_port"]
        http_port = cfg["router"]["http_port"]
        c = head_container(rc)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == port and ports["router-metrics"] == metrics_port
        assert ports["http"] == http_port == 8000
        assert ports["gcs-server"] == 6379 and ports["metrics"] == 8080
        # Native gRPC probes against grpc.health.v1 on the router's port.
        assert c["livenessProbe"]["grpc"] == {"port": port}
        assert c["startupProbe"]["grpc"] == {"port": port}
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": "batonserve.v1.Generation"}
        assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] == 600
        [svc] = find(docs, "Service", FULLNAME)
        by_name = {p["name"]: p for p in svc["spec"]["ports"]}
        assert by_name["grpc"]["appProtocol"] == "grpc"
        assert by_name["grpc"]["port"] == port and by_name["grpc"]["targetPort"] == "grpc"
        assert by_name["metrics"]["port"] == metrics_port
        assert by_name["http"]["port"] == http_port and by_name["http"]["targetPort"] == "http"
        assert by_name["metrics"]["targetPort"] == "router-metrics"
        assert svc["spec"]["selector"] == {"ray.io/cluster": FULLNAME, "ray.io/node-type": "head"}
        assert rc["metadata"]["name"] == FULLNAME  # what KubeRay puts in ray.io/cluster


def test_restricted_security_context(rendered: Render) -> None:
    for scenario in ("default", "heterogeneous", "model-cache"):
        for t in pod_templates(raycluster(rendered(scenario))):
            spec = t["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert spec["automountServiceAccountToken"] is False
            volumes = {v["name"]: v for v in spec["volumes"]}
            for c in spec["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["readOnlyRootFilesystem"] is True
                assert sc["runAsNonRoot"] is True
                assert sc["capabilities"] == {"drop": ["ALL"]}
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
                # Writable emptyDirs wherever Ray and Python write on a read-only root.
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                for path in ("/tmp", "/tmp/ray", "/dev/shm"):
                    assert "emptyDir" in volumes[mounts[path]], path
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
                assert {"name": "HOME", "value": "/tmp"} in c["env"]


def test_heterogeneous_pools(rendered: Render) -> None:
    docs = rendered("heterogeneous")
    rc = raycluster(docs)
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert list(groups) == ["prefill", "decode", "mixed"]
    pre, dec, mix = groups["prefill"], groups["decode"], groups["mixed"]
    assert (pre["replicas"], pre["minReplicas"], pre["maxReplicas"]) == (2, 1, 8)
    assert (dec["replicas"], dec["minReplicas"], dec["maxReplicas"]) == (3, 1, 6)
    # Accelerator type and custom resources reach Ray as node resources, role as node labels.
    assert pre["rayStartParams"] == {
        "labels": "batonserve.io/gpu=h100,batonserve.io/pool=prefill,batonserve.io/role=prefill",
        "num-cpus": "8",
        "num-gpus": "1",
        "resources": "'{\"accelerator_type:H100\":1}'",
    }
    assert json.loads(dec["rayStartParams"]["resources"].strip("'")) == {
        "accelerator_type:A100-80G": 1,
        "decode_slot": 1,
    }
    assert "batonserve.io/role=decode" in dec["rayStartParams"]["labels"].split(",")
    # Kubernetes placement: GPU limits, node selectors per GPU type, tolerations, affinity.
    pre_spec, dec_spec = pre["template"]["spec"], dec["template"]["spec"]
    assert pre_spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert dec_spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    pre_c = pre_spec["containers"][0]
    assert pre_c["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi", "nvidia.com/gpu": 1},
    }
    assert dec_spec["tolerations"][1] == {
        "key": "spot",
        "operator": "Equal",
        "value": "true",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    }
    anti = dec_spec["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert pre["template"]["metadata"]["labels"]["batonserve.io/role"] == "prefill"
    # The pool that set nothing gets PoolConfig's defaults, as `batonserve serve` would.
    d = PoolConfig(name="mixed", role="mixed")
    assert (mix["replicas"], mix["minReplicas"], mix["maxReplicas"]) == (
        d.replicas,
        d.min_replicas,
        d.replicas,
    )
    assert mix["rayStartParams"]["num-cpus"] == "1"
    # Image, pull secrets, and the existing claim for weights (no PVC created).
    for t in pod_templates(rc):
        c = t["spec"]["containers"][0]
        assert c["image"] == "registry.example.com/batonserve:0.1.0-cuda12"
        assert c["imagePullPolicy"] == "Always"
        assert t["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        [vol] = [v for v in t["spec"]["volumes"] if v["name"] == "models"]
        assert vol["persistentVolumeClaim"] == {"claimName": "llama-weights", "readOnly": True}
    assert find(docs, "PersistentVolumeClaim") == []
    assert sorted(p["metadata"]["name"] for p in find(docs, "PodDisruptionBudget")) == [
        f"{FULLNAME}-decode",
        f"{FULLNAME}-mixed",
        f"{FULLNAME}-prefill",
    ]


def test_monitoring_on(rendered: Render) -> None:
    docs = rendered("monitoring")
    [svc] = find(docs, "Service", FULLNAME)
    [sm] = find(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for k, v in sm["spec"]["selector"]["matchLabels"].items():
        assert svc["metadata"]["labels"][k] == v  # selects the router's Service
    assert sm["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
    ]
    assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    [pm] = find(docs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": FULLNAME}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for t in pod_templates(raycluster(docs)):  # every Ray node exposes the port scraped
        assert "metrics" in {p["name"] for p in t["spec"]["containers"][0]["ports"]}
    [dash] = find(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert dash["metadata"]["namespace"] == "monitoring"
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dash["data"]["batonserve.json"])
    assert board == json.loads((CHART / "dashboards" / "batonserve.json").read_text())
    assert board["uid"] == "batonserve" and board["panels"]


def test_network_policy(rendered: Render) -> None:
    default = rendered("default")
    [router] = find(default, "NetworkPolicy", f"{FULLNAME}-router")
    assert router["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"
    # The doors open to any client: the router's gRPC port and its OpenAI HTTP port.
    assert router["spec"]["ingress"] == [
        {"ports": [{"port": 8001, "protocol": "TCP"}, {"port": 8000, "protocol": "TCP"}]}
    ]
    [cluster] = find(default, "NetworkPolicy", f"{FULLNAME}-cluster")
    intra, metrics = cluster["spec"]["ingress"]
    assert "ports" not in intra  # all Ray ports, but only from the release's pods
    assert intra["from"] == [{"podSelector": {"matchLabels": {"ray.io/cluster": FULLNAME}}}]
    assert metrics["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    assert {p["port"] for p in metrics["ports"]} == {9400, 8080}
    mon = rendered("monitoring")
    [router] = find(mon, "NetworkPolicy", f"{FULLNAME}-router")
    assert router["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "inference-clients"}}}
    ]
    [cluster] = find(mon, "NetworkPolicy", f"{FULLNAME}-cluster")
    peer = cluster["spec"]["ingress"][1]["from"][0]
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert {p["port"] for p in cluster["spec"]["ingress"][1]["ports"]} == {9500, 8080}


def test_model_cache_on(rendered: Render) -> None:
    docs = rendered("model-cache")
    [pvc] = find(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == f"{FULLNAME}-models"
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert pvc["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "fast-rwx",
        "resources": {"requests": {"storage": "500Gi"}},
    }
    for t in pod_templates(raycluster(docs)):
        [vol] = [v for v in t["spec"]["volumes"] if v["name"] == "models"]
        assert vol["persistentVolumeClaim"]["claimName"] == f"{FULLNAME}-models"
        c = t["spec"]["containers"][0]
        assert {"name": "models", "mountPath": "/weights", "readOnly": False} in c["volumeMounts"]
        assert {"name": "HF_HOME", "value": "/weights/hf"} in c["env"]
    [svc] = find(docs, "Service", FULLNAME)
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["metadata"]["annotations"] == {
        "service.beta.kubernetes.io/aws-load-balancer-type": "nlb"
    }
    assert find(docs, "PodDisruptionBudget") == [] and find(docs, "NetworkPolicy") == []


def test_release_name_containing_chart_name() -> None:
    r = template(release="batonserve-prod")
    assert r.returncode == 0, r.stderr
    assert raycluster(parse(r.stdout))["metadata"]["name"] == "batonserve-prod"


def _ray_node(group: dict[str, Any]) -> tuple[dict[str, str], dict[str, float]]:
    """The Ray labels and resources a worker group's nodes start with."""
    params = group["rayStartParams"]
    labels = dict(kv.split("=", 1) for kv in params["labels"].split(","))
    res = json.loads(params.get("resources", "'{}'").strip("'"))
    res["CPU"] = float(params["num-cpus"])
    res["GPU"] = float(params.get("num-gpus", 0))
    return labels, res


def test_controller_places_each_pool_on_its_own_group(rendered: Render) -> None:
    """The controller's actor options for a pool fit that pool's worker group and no other."""
    from batonserve.cluster.controller import actor_options  # imports Ray: only here

    for scenario in ("default", "heterogeneous"):
        docs = rendered(scenario)
        [cm] = find(docs, "ConfigMap", f"{FULLNAME}-config")
        cfg = yaml.safe_load(cm["data"]["config.yaml"])
        pools = [
            PoolConfig(**{k: v for k, v in p.items() if k != "kubernetes"}) for p in cfg["pools"]
        ]
        nodes = {g["groupName"]: _ray_node(g) for g in raycluster(docs)["spec"]["workerGroupSpecs"]}
        for pool in pools:
            opts = actor_options(pool, f"{pool.name}-0", "batonserve")
            need = dict(opts.get("resources", {}), CPU=opts["num_cpus"], GPU=opts["num_gpus"])
            if "accelerator_type" in opts:
                need[f"accelerator_type:{opts['accelerator_type']}"] = 0.001
            fits = [
                name
                for name, (labels, res) in nodes.items()
                if all(labels.get(k) == v for k, v in opts.get("label_selector", {}).items())
                and all(res.get(r, 0.0) >= amount for r, amount in need.items())
            ]
            assert fits == [pool.name], (scenario, pool.name, fits)

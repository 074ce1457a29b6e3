"""Kubernetes integration: read a batonserve RayCluster's state and patch its worker-group replicas."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batonserve.cluster.schema import ConfigError

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayclusters"
# A CRD takes JSON Patch and JSON merge patch, but no strategic merge patch (that needs Go struct
# tags). A merge patch can only replace the whole workerGroupSpecs list, racing with every other
# writer of it (KubeRay's autoscaler, `helm upgrade`); JSON Patch addresses one item's field.
JSON_PATCH = "application/json-patch+json"
CHART_NAME = "batonserve"
IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeError(RuntimeError):
    """The Kubernetes API refused or failed a request; the message says which object and why."""


@dataclass(frozen=True)
class ClusterRef:
    """Which RayCluster: namespace and object name."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"raycluster {self.namespace}/{self.name}"


@dataclass(frozen=True)
class WorkerGroupState:
    """One worker group (= one batonserve pool) as the API reports it."""

    name: str
    role: str  # from the group's pod labels; "" if the group was not made by the chart
    replicas: int  # desired
    min_replicas: int
    max_replicas: int
    accelerator_type: str  # from rayStartParams resources "accelerator_type:<type>"
    pods: int  # worker pods that exist now
    ready_pods: int


@dataclass(frozen=True)
class RayClusterState:
    """A RayCluster read back: overall state plus every worker group."""

    ref: ClusterRef
    state: str  # KubeRay's status.state, e.g. "ready"; "" before the operator has seen it
    head_ready: bool
    groups: tuple[WorkerGroupState, ...]

    def group(self, name: str) -> WorkerGroupState:
        """The group called `name`, or a clear error listing the groups there are."""
        for g in self.groups:
            if g.name == name:
                return g
        have = ", ".join(g.name for g in self.groups) or "none"
        raise ConfigError(f"pool {name!r}: {self.ref} has no such worker group (it has: {have})")


def release_fullname(release: str) -> str:
    """The RayCluster name the chart gives a release (its `batonserve.fullname` template)."""
    name = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
    return name[:40].rstrip("-")


def _accelerator_type(params: Mapping[str, Any]) -> str:
    raw = str(params.get("resources", "")).strip("'\"` ")
    if not raw:
        return ""
    try:
        res = json.loads(raw)
    except ValueError:
        return ""
    for key in res if isinstance(res, dict) else ():
        if key.startswith("accelerator_type:"):
            return str(key.split(":", 1)[1])
    return ""


def _pod_ready(pod: Any) -> bool:
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


def parse_state(ref: ClusterRef, obj: Mapping[str, Any], pods: list[Any]) -> RayClusterState:
    """Typed state from the RayCluster object and its pods (V1Pod objects)."""
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    by_group: dict[str, list[Any]] = {}
    head_ready = False
    for pod in pods:
        labels = pod.metadata.labels or {}
        if labels.get("ray.io/node-type") == "head":
            head_ready = head_ready or _pod_ready(pod)
        else:
            by_group.setdefault(labels.get("ray.io/group", ""), []).append(pod)
    groups = []
    for g in spec.get("workerGroupSpecs") or []:
        name = str(g.get("groupName", ""))
        labels = ((g.get("template") or {}).get("metadata") or {}).get("labels") or {}
        replicas = int(g.get("replicas", g.get("minReplicas", 0)) or 0)
        members = by_group.get(name, [])
        groups.append(
            WorkerGroupState(
                name=name,
                role=str(labels.get("batonserve.io/role", "")),
                replicas=replicas,
                min_replicas=int(g.get("minReplicas") or 0),
                max_replicas=int(g.get("maxReplicas") or 0),
                accelerator_type=_accelerator_type(g.get("rayStartParams") or {}),
                pods=len(members),
                ready_pods=sum(_pod_ready(p) for p in members),
            )
        )
    return RayClusterState(
        ref=ref, state=str(status.get("state", "")), head_ready=head_ready, groups=tuple(groups)
    )


def replica_patch(obj: Mapping[str, Any], targets: Mapping[str, int]) -> list[dict[str, Any]]:
    """RFC 6902 operations setting each named group's replicas; [] when nothing changes.

    Each group is addressed by its list index, guarded by a `test` of its groupName so a list
    reordered since our read fails the whole patch instead of scaling the wrong group. Bounds are
    widened when the target is outside [minReplicas, maxReplicas]: KubeRay clamps replicas to them.
    """
    specs = list((obj.get("spec") or {}).get("workerGroupSpecs") or [])
    index = {str(g.get("groupName")): i for i, g in enumerate(specs)}
    ops: list[dict[str, Any]] = []
    for name, replicas in targets.items():
        if replicas < 0:
            raise ConfigError(f"pool {name!r}: replicas must be >= 0, got {replicas}")
        if name not in index:
            have = ", ".join(index) or "none"
            raise ConfigError(f"pool {name!r}: no such worker group (the cluster has: {have})")
        i = index[name]
        g = specs[i]
        if g.get("replicas") == replicas:
            continue
        base = f"/spec/workerGroupSpecs/{i}"
        ops.append({"op": "test", "path": f"{base}/groupName", "value": name})
        if replicas > int(g.get("maxReplicas") or 0):
            ops.append({"op": "replace", "path": f"{base}/maxReplicas", "value": replicas})
        if replicas < int(g.get("minReplicas") or 0):
            ops.append({"op": "replace", "path": f"{base}/minReplicas", "value": replicas})
        verb = "replace" if "replicas" in g else "add"
        ops.append({"op": verb, "path": f"{base}/replicas", "value": replicas})
    return ops


def _new_api_client(kubeconfig: str | None, context: str | None) -> Any:
    from kubernetes import client, config

    cfg = client.Configuration()
    path = kubeconfig or os.path.expanduser(config.KUBE_CONFIG_DEFAULT_LOCATION)
    if kubeconfig or os.path.exists(path):
        try:
            config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
        except (config.ConfigException, OSError) as e:
            raise KubeError(f"kubeconfig {path}: {e}") from None
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException as e:
            raise KubeError(f"no kubeconfig at {path} and not running in a pod: {e}") from None
    return client.ApiClient(cfg)


def default_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace of the kubeconfig context (or of the pod we run in), else "default"."""
    from kubernetes import config

    path = kubeconfig or os.path.expanduser(config.KUBE_CONFIG_DEFAULT_LOCATION)
    if kubeconfig or os.path.exists(path):
        try:
            contexts, active = config.list_kube_config_contexts(config_file=path)
        except (config.ConfigException, OSError) as e:
            raise KubeError(f"kubeconfig {path}: {e}") from None
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        return str(((chosen or {}).get("context") or {}).get("namespace") or "default")
    if os.path.exists(IN_CLUSTER_NAMESPACE_FILE):
        with open(IN_CLUSTER_NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    return "default"


class RayClusterClient:
    """The few calls `batonserve scale` makes, through the official kubernetes client."""

    def __init__(self, ref: ClusterRef, api_client: Any) -> None:
        from kubernetes import client

        self.ref = ref
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    @classmethod
    def connect(
        cls, ref: ClusterRef, kubeconfig: str | None = None, context: str | None = None
    ) -> RayClusterClient:
        """A client from a kubeconfig file (or ~/.kube/config), else the pod's in-cluster config."""
        return cls(ref, _new_api_client(kubeconfig, context))

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status == 404:
                raise KubeError(f"{self.ref} not found (is the release installed there?)") from None
            reason = e.reason or ""
            with contextlib.suppress(ValueError, AttributeError):  # not a Status object
                reason = json.loads(e.body or "{}").get("message", reason)
            raise KubeError(f"{what} {self.ref}: HTTP {e.status}: {reason}") from None
        except OSError as e:  # connection refused, DNS, TLS
            raise KubeError(f"{what} {self.ref}: cannot reach the Kubernetes API: {e}") from None

    def get(self) -> dict[str, Any]:
        """The RayCluster object as JSON data."""
        obj = self._call(
            "reading",
            self._custom.get_namespaced_custom_object,
            RAY_GROUP,
            RAY_VERSION,
            self.ref.namespace,
            RAY_PLURAL,
            self.ref.name,
        )
        return dict(obj)

    def pods(self) -> list[Any]:
        """The cluster's pods (head and workers), found by KubeRay's ray.io/cluster label."""
        result = self._call(
            "listing pods of",
            self._core.list_namespaced_pod,
            self.ref.namespace,
            label_selector=f"ray.io/cluster={self.ref.name}",
        )
        return list(result.items or [])

    def state(self) -> RayClusterState:
        """The cluster and its groups, read back from the API."""
        return parse_state(self.ref, self.get(), self.pods())

    def patch(self, ops: list[dict[str, Any]]) -> dict[str, Any]:
        """Send a JSON Patch to the RayCluster; returns the patched object."""
        obj = self._call(
            "patching",
            self._custom.patch_namespaced_custom_object,
            RAY_GROUP,
            RAY_VERSION,
            self.ref.namespace,
            RAY_PLURAL,
            self.ref.name,
            ops,
            _content_type=JSON_PATCH,
        )
        return dict(obj)

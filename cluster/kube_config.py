"""Kubernetes-only settings: the `kubernetes` section of ServeConfig and of each pool (read by the Helm chart)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from batonserve.cluster.schema import ConfigError

PullPolicy = Literal["Always", "IfNotPresent", "Never"]
ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
AccessMode = Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]
TaintEffect = Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"]

# Ports the Ray processes of a KubeRay pod listen on (GCS, dashboard, client, metrics, agent):
# the router must not take them.
RAY_RESERVED_PORTS = (6379, 8265, 10001, 8080, 52365)


@dataclass(frozen=True)
class ImageConfig:
    """The container image every pod runs (Ray and batonserve installed, same version everywhere)."""

    repository: str = "batonserve"
    tag: str = ""  # empty takes the chart's appVersion
    pull_policy: PullPolicy = "IfNotPresent"
    pull_secrets: tuple[str, ...] = ()  # names of docker-registry Secrets


@dataclass(frozen=True)
class ServiceConfig:
    """The Service in front of the router: a `grpc` port and a `metrics` port."""

    type: ServiceType = "ClusterIP"
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MonitorConfig:
    """One Prometheus-operator scrape object (ServiceMonitor or PodMonitor)."""

    enabled: bool = False
    interval: str = "30s"
    scrape_timeout: str = ""  # empty keeps Prometheus' default
    labels: dict[str, str] = field(default_factory=dict)  # what the Prometheus selects on


@dataclass(frozen=True)
class MonitoringConfig:
    """ServiceMonitor scrapes the router's metrics; PodMonitor scrapes every Ray node's metrics."""

    service_monitor: MonitorConfig = field(default_factory=MonitorConfig)
    pod_monitor: MonitorConfig = field(default_factory=MonitorConfig)


@dataclass(frozen=True)
class GrafanaDashboardConfig:
    """The Grafana dashboard as a ConfigMap, picked up by the Grafana sidecar through its labels."""

    enabled: bool = False
    namespace: str = ""  # empty: the release's namespace
    labels: dict[str, str] = field(default_factory=lambda: {"grafana_dashboard": "1"})
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelCacheConfig:
    """A volume holding model weights, mounted on every pod (new PVC, or an existing claim)."""

    enabled: bool = False
    existing_claim: str = ""  # use this PVC instead of creating one
    size: str = "100Gi"
    storage_class: str = ""  # empty: the cluster's default StorageClass
    access_mode: AccessMode = "ReadWriteMany"  # every pod mounts it
    mount_path: str = "/models"
    read_only: bool = False


@dataclass(frozen=True)
class ServiceAccountConfig:
    """The pods' ServiceAccount; they need no Kubernetes API access, so no token is mounted."""

    create: bool = True
    name: str = ""  # empty: the release's full name (or "default" when create is false)
    annotations: dict[str, str] = field(default_factory=dict)
    automount_token: bool = False


@dataclass(frozen=True)
class PodDisruptionBudgetConfig:
    """One PodDisruptionBudget per worker pool: voluntary evictions take at most this many at once."""

    enabled: bool = True
    max_unavailable: int = 1


@dataclass(frozen=True)
class NetworkPolicyConfig:
    """Only the router's gRPC port is open to clients; Ray ports only between the release's pods."""

    enabled: bool = True
    # Who may call the gRPC port; both empty means any client.
    client_namespace_selector: dict[str, str] = field(default_factory=dict)
    client_pod_selector: dict[str, str] = field(default_factory=dict)
    # Who may scrape the metrics ports (router and Ray); both empty means nobody outside.
    metrics_namespace_selector: dict[str, str] = field(
        default_factory=lambda: {"kubernetes.io/metadata.name": "monitoring"}
    )
    metrics_pod_selector: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ResourcesConfig:
    """Kubernetes container resources (quantities as strings, e.g. "8Gi", "500m")."""

    requests: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Toleration:
    """A Kubernetes toleration (e.g. for tainted GPU nodes)."""

    key: str = ""
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = ""
    effect: TaintEffect = ""
    toleration_seconds: int | None = None


@dataclass(frozen=True)
class PodPlacement:
    """Where a group's pods go and what they get, on top of what the pool's Ray settings imply."""

    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    affinity: dict[str, Any] = field(default_factory=dict)  # Kubernetes Affinity, passed through
    ray_start_params: dict[str, str] = field(default_factory=dict)  # extra `ray start` flags
    pod_annotations: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PoolKubernetesConfig(PodPlacement):
    """A pool's pod settings; GPU limits come from the pool's num_gpus under this resource name."""

    gpu_resource_name: str = "nvidia.com/gpu"


@dataclass(frozen=True)
class HeadConfig(PodPlacement):
    """The head pod: Ray head plus the router (the Ray driver)."""

    resources: ResourcesConfig = field(
        default_factory=lambda: ResourcesConfig(
            requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"}
        )
    )
    startup_timeout_s: int = 600  # model load time allowed before liveness probes count


@dataclass(frozen=True)
class SecurityContextConfig:
    """The restricted pod security context; only ids and the root filesystem mode can change."""

    run_as_user: int = 1000  # the `ray` user of the rayproject/ray images
    run_as_group: int = 100
    fs_group: int = 100
    read_only_root_filesystem: bool = True


@dataclass(frozen=True)
class KubernetesConfig:
    """Settings used only when deployed by the Helm chart; `batonserve serve` ignores them."""

    image: ImageConfig = field(default_factory=ImageConfig)
    ray_version: str = ""  # RayCluster spec.rayVersion; empty leaves it unset
    # KubeRay >= 1.6 replaces every pod when a pod template changes (a new image or config);
    # "None" leaves running pods alone until deleted by hand.
    upgrade_strategy: Literal["Recreate", "None"] = "Recreate"
    service: ServiceConfig = field(default_factory=ServiceConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    grafana_dashboard: GrafanaDashboardConfig = field(default_factory=GrafanaDashboardConfig)
    model_cache: ModelCacheConfig = field(default_factory=ModelCacheConfig)
    service_account: ServiceAccountConfig = field(default_factory=ServiceAccountConfig)
    pod_disruption_budget: PodDisruptionBudgetConfig = field(
        default_factory=PodDisruptionBudgetConfig
    )
    network_policy: NetworkPolicyConfig = field(default_factory=NetworkPolicyConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    security_context: SecurityContextConfig = field(default_factory=SecurityContextConfig)
    shm_size: str = ""  # sizeLimit of the /dev/shm volume (Ray's object store); empty: no limit
    env: dict[str, str] = field(default_factory=dict)  # extra environment on every pod
    pod_annotations: dict[str, str] = field(default_factory=dict)
    pod_labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pod_disruption_budget.max_unavailable < 1:
            raise ConfigError(
                "kubernetes.pod_disruption_budget.max_unavailable: must be >= 1 "
                f"(0 blocks node drains), got {self.pod_disruption_budget.max_unavailable}"
            )
        if self.head.startup_timeout_s < 10:
            raise ConfigError(
                f"kubernetes.head.startup_timeout_s: must be >= 10, got {self.head.startup_timeout_s}"
            )


__all__ = [
    "RAY_RESERVED_PORTS",
    "GrafanaDashboardConfig",
    "HeadConfig",
    "ImageConfig",
    "KubernetesConfig",
    "ModelCacheConfig",
    "MonitorConfig",
    "MonitoringConfig",
    "NetworkPolicyConfig",
    "PodDisruptionBudgetConfig",
    "PodPlacement",
    "PoolKubernetesConfig",
    "ResourcesConfig",
    "SecurityContextConfig",
    "ServiceAccountConfig",
    "ServiceConfig",
    "Toleration",
]

"""The serving configuration: one frozen tree, loaded from CLI flags or YAML (same schema as the Helm values)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from batonserve.cluster.kube_config import KubernetesConfig, PoolKubernetesConfig
from batonserve.cluster.scheduling.config import SchedulerConfig
from batonserve.cluster.schema import ConfigError, from_dict, to_dict
from batonserve.workers.config import EngineConfig, Role
from batonserve.workers.kv_transfer.config import KVTransferConfig
from batonserve.workers.sp_serving.config import SequenceParallelConfig


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS: PEM files for the router's gRPC port."""

    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class AuthConfig:
    """Bearer-token auth; the token comes from a file or the environment, never a flag value."""

    token_file: str = ""
    token_env: str = ""  # name of the environment variable that holds the token


@dataclass(frozen=True)
class RouterConfig:
    """The gRPC router, its OpenAI-compatible HTTP API, and the metrics endpoint."""

    host: str = "127.0.0.1"
    port: int = 8001
    http_enabled: bool = True  # the OpenAI-compatible API on router.host:http_port
    http_port: int = 8000
    chat_template: str = ""  # a Jinja file overriding the model's own chat template
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9400
    grace_period_s: float = 30.0
    reflection: bool = True
    max_message_bytes: int = 4 * 1024 * 1024
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


@dataclass(frozen=True)
class RayConfig:
    """How to reach Ray: empty address starts a local instance on 127.0.0.1."""

    address: str = ""
    namespace: str = "batonserve"
    # Logical CPUs of a local instance; 0: the machine's cores, raised to what the pools ask for.
    num_cpus: int = 0
    include_dashboard: bool = True  # the Ray dashboard of a local instance, on 127.0.0.1
    dashboard_port: int = 8265
    # Pools that do not fit the cluster fail start-up at once, unless an autoscaler will add nodes.
    wait_for_resources: bool = False
    worker_start_timeout_s: float = 600.0  # a worker not ready by then fails start-up, with why
    # A scale-down drain waits this long for its running requests, then moves the rest elsewhere.
    drain_timeout_s: float = 120.0


@dataclass(frozen=True)
class PoolConfig:
    """One pool of identical workers sharing a role and placement."""

    name: str
    role: Role
    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 0  # 0 means equal to replicas
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Ranks (devices) per worker: a worker of N is N Ray actors gang-placed by a placement group
    # (workers/tp/); num_cpus/num_gpus/resources are per rank.
    tensor_parallel_size: int = 1
    tensor_parallel_spread: bool = False  # PACK instead of STRICT_PACK: a group may span nodes
    accelerator_type: str = ""  # passed to Ray, e.g. "H100"
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    node_labels: dict[str, str] = field(default_factory=dict)  # Ray node label selector
    kubernetes: PoolKubernetesConfig = field(default_factory=PoolKubernetesConfig)  # Helm only


@dataclass(frozen=True)
class ServeConfig:
    """Everything `batonserve serve` needs."""

    model: str = "demo"
    served_model_name: str = ""  # defaults to the model's directory name
    router: RouterConfig = field(default_factory=RouterConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pools: tuple[PoolConfig, ...] = (
        PoolConfig(name="prefill", role="prefill"),
        PoolConfig(name="decode", role="decode"),
    )
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)  # Helm only
    kv_transfer: KVTransferConfig = field(default_factory=KVTransferConfig)
    sequence_parallel: SequenceParallelConfig = field(default_factory=SequenceParallelConfig)
    # Sections owned by later parts (scheduler, kv transfer, sequence parallel, MoE, Kubernetes)
    # are added here as their own dataclasses.

    def __post_init__(self) -> None:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ConfigError(f"pools: pool names must be unique, got {names}")
        for i, p in enumerate(self.pools):
            if p.replicas < 0:
                raise ConfigError(f"pools[{i}].replicas: must be >= 0, got {p.replicas}")
            if p.tensor_parallel_size < 1:
                raise ConfigError(
                    f"pools[{i}].tensor_parallel_size: must be >= 1, got {p.tensor_parallel_size}"
                )
        self._check_expert_parallel()
        self._check_tensor_parallel()
        for key in ("worker_start_timeout_s", "drain_timeout_s"):
            if getattr(self.ray, key) <= 0:
                raise ConfigError(f"ray.{key}: must be > 0, got {getattr(self.ray, key)}")
        for key in ("port", "http_port", "metrics_port"):
            port = getattr(self.router, key)
            if not 0 <= port <= 65535:
                raise ConfigError(f"router.{key}: must be a TCP port (0-65535), got {port}")

    def _check_expert_parallel(self) -> None:
        """An EP leader owns its process's default torch.distributed group; so does a ring member."""
        n = self.engine.expert_parallel_size
        if n > 1 and self.sequence_parallel.enabled and ring_members(self):
            raise ConfigError(
                f"engine.expert_parallel_size: {n} cannot be combined with "
                "sequence_parallel.enabled (the prefill pool forms a ring group); turn one off"
            )

    def _check_tensor_parallel(self) -> None:
        """A TP worker owns its process's default torch.distributed group, as an EP leader and a
        ring member do; its ranks hold slices of every expert, so no EP either (the expert store
        works per rank), and no token regrouping (it reads the embedding, which TP splits)."""
        tp = [p for p in self.pools if p.tensor_parallel_size > 1]
        if not tp:
            return
        p = tp[0]
        what = f"pools[{self.pools.index(p)}].tensor_parallel_size: {p.tensor_parallel_size}"
        ring = ring_members(self)  # names "<first prefill pool>-<i>"
        ring_pool = next((q for q in self.pools if q.role == "prefill"), None)
        if ring and self.sequence_parallel.enabled and ring_pool in tp:
            assert ring_pool is not None
            i, n = self.pools.index(ring_pool), ring_pool.tensor_parallel_size
            raise ConfigError(
                f"pools[{i}].tensor_parallel_size: {n} cannot be combined with sequence_parallel.enabled (ring prefill runs one "
                "rank per ring member); use tensor_parallel_size 1 in the prefill pool or turn "
                "the ring off"
            )
        for key, on in (
            ("expert_parallel_size", self.engine.expert_parallel_size > 1),
            ("moe_regroup_batch", bool(self.engine.moe_regroup_batch)),
        ):
            if on:
                raise ConfigError(
                    f"{what} cannot be combined with engine.{key} (under TP every rank holds a "
                    "slice of every expert); leave it unset"
                )


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> ServeConfig:
    """Read YAML (if given), apply dotted-key overrides from CLI flags, and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded or {}
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(ServeConfig, data)


def dump_config(cfg: ServeConfig) -> str:
    """YAML text of a config (what the Helm chart renders, and what load_config reads back)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "AuthConfig",
    "ConfigError",
    "EngineConfig",
    "PoolConfig",
    "RayConfig",
    "RouterConfig",
    "ServeConfig",
    "TLSConfig",
    "dump_config",
    "load_config",
    "replace",
]


def ring_members(config: ServeConfig) -> tuple[str, ...]:
    """Worker names of the ring group: the first prefill pool, up to max_group_size."""
    sp = config.sequence_parallel
    for pool in config.pools:
        if pool.role == "prefill":
            n = min(pool.replicas, sp.max_group_size)
            return tuple(f"{pool.name}-{i}" for i in range(n)) if n >= 2 else ()
    return ()

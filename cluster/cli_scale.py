"""`batonserve scale`: apply a plan (or --pool NAME=N) to a deployed RayCluster, and show its state.

With `--ray-address` it sets the running cluster's desired pool sizes instead (its controller
starts or drains workers); give `--release`/`--name` too to patch the RayCluster's pods as well."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batonserve.cluster.kube import (
    ClusterRef,
    KubeError,
    RayClusterClient,
    RayClusterState,
    default_namespace,
    release_fullname,
    replica_patch,
)
from batonserve.cluster.schema import ConfigError, from_dict


@dataclass(frozen=True)
class PlanPool:
    """One pool of a plan: how many workers, and on which machine type the planner assumed."""

    replicas: int
    machine: str = ""
    tensor_parallel_size: int = 1  # GPUs per worker the planner assumed (scale changes counts only)


@dataclass(frozen=True)
class ScalePlan:
    """Target replicas per pool (the `pools:` part of what `batonserve plan --output` writes)."""

    pools: dict[str, PlanPool] = field(default_factory=dict)


def load_plan(path: str | Path) -> ScalePlan:
    """Read a plan file; only its `pools` section matters here (other sections are reports)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read plan file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"plan file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("pools"), dict):
        raise ConfigError(f"plan file {path}: expected a mapping with a `pools:` mapping")
    plan = from_dict(ScalePlan, {"pools": data["pools"]})
    for name, pool in plan.pools.items():
        if pool.replicas < 0:
            raise ConfigError(f"pools.{name}.replicas: must be >= 0, got {pool.replicas}")
    return plan


def parse_pool_flag(text: str) -> tuple[str, int]:
    """`NAME=N` from a --pool flag."""
    name, sep, count = text.partition("=")
    if not sep or not name or not re.fullmatch(r"\d+", count.strip()):
        raise ConfigError(f"--pool: expected NAME=REPLICAS (e.g. decode=4), got {text!r}")
    return name.strip(), int(count)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def machine_warnings(plan: ScalePlan, state: RayClusterState) -> list[str]:
    """Pools whose planned machine type differs from what their pods run (scale cannot fix that)."""
    out = []
    for name, pool in plan.pools.items():
        acc = next((g.accelerator_type for g in state.groups if g.name == name), "")
        if pool.machine and acc and _norm(acc) not in _norm(pool.machine):
            out.append(
                f"pool {name}: the plan assumes machine {pool.machine!r} but its pods run "
                f"accelerator_type {acc!r}; scaling keeps the current type (change the pool's "
                "accelerator_type and node_selector in the values, then `helm upgrade`)"
            )
    return out


def format_state(state: RayClusterState) -> str:
    """A small table of the cluster's worker groups."""
    head = "ready" if state.head_ready else "not ready"
    lines = [f"{state.ref}: state {state.state or 'unknown'}, head {head}"]
    rows = [("POOL", "ROLE", "ACCEL", "DESIRED", "MIN", "MAX", "PODS", "READY")]
    for g in state.groups:
        rows.append(
            (
                g.name,
                g.role or "-",
                g.accelerator_type or "-",
                str(g.replicas),
                str(g.min_replicas),
                str(g.max_replicas),
                str(g.pods),
                str(g.ready_pods),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of `batonserve scale`: 0 on success, 1 when the Kubernetes API fails."""
    try:
        return _scale(args)
    except KubeError as e:
        print(f"batonserve: error: {e}", file=sys.stderr)
        return 1


def _scale(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan) if args.plan else ScalePlan()
    targets = {name: p.replicas for name, p in plan.pools.items()}
    for flag in args.pool or []:
        name, count = parse_pool_flag(flag)
        targets[name] = count
    if not targets and not args.show:
        raise ConfigError("nothing to do: give --plan FILE, --pool NAME=N, or --show")
    if args.ray_address:
        if not targets:
            raise ConfigError("--ray-address: give --plan FILE or --pool NAME=N")
        from batonserve.cluster.scale_live import set_live_replicas

        refusals = set_live_replicas(args.ray_address, args.ray_namespace, targets)
        for why in refusals:
            print(f"batonserve: error: {why}", file=sys.stderr)
        if refusals:
            return 1
        changes = ", ".join(f"{k}={v}" for k, v in targets.items())
        print(f"desired replicas set on the running cluster: {changes}")
        if not (args.name or args.release):
            return 0
    name = args.name or release_fullname(args.release or "batonserve")
    namespace = args.namespace or default_namespace(args.kubeconfig, args.context)
    kube = RayClusterClient.connect(ClusterRef(namespace, name), args.kubeconfig, args.context)
    if targets:
        obj = kube.get()
        ops = replica_patch(obj, targets)
        for warning in machine_warnings(plan, kube.state()):
            print(f"batonserve: warning: {warning}", file=sys.stderr)
        if args.dry_run:
            print(json.dumps(ops, indent=2))
            return 0
        if ops:
            kube.patch(ops)
            changes = ", ".join(f"{k}={v}" for k, v in targets.items())
            print(f"scaled {kube.ref}: {changes}")
        else:
            print(f"{kube.ref}: already at the requested replicas")
    if args.show or not targets:
        print(format_state(kube.state()))
    return 0


def register(subparsers: Any) -> None:
    """Add `batonserve scale` to the CLI."""
    p = subparsers.add_parser(
        "scale",
        help="set worker-pool replicas of a deployed RayCluster (Helm release) and show its state",
        description=__doc__,
    )
    p.add_argument("--plan", metavar="FILE", help="plan YAML (`batonserve plan --output`)")
    p.add_argument(
        "--pool",
        action="append",
        metavar="NAME=N",
        help="set one pool's replicas (repeatable; wins over the plan)",
    )
    p.add_argument("--show", action="store_true", help="print the cluster's pools and pods")
    p.add_argument("--dry-run", action="store_true", help="print the JSON Patch, send nothing")
    p.add_argument("-n", "--namespace", help="default: the kubeconfig context's namespace")
    who = p.add_mutually_exclusive_group()
    who.add_argument(
        "--release", help="Helm release name (default: batonserve, unless --ray-address alone)"
    )
    who.add_argument("--name", help="RayCluster name (instead of --release)")
    p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: ~/.kube/config, else in-cluster)"
    )
    p.add_argument("--context", help="kubeconfig context (default: the current one)")
    p.add_argument(
        "--ray-address",
        help="set the desired sizes of the batonserve cluster running in this Ray cluster",
    )
    p.add_argument(
        "--ray-namespace", default="batonserve", help="its Ray namespace (default: %(default)s)"
    )
    p.set_defaults(func=run)

"""The Helm chart's values.schema.json, generated from the ServeConfig dataclasses so the two never drift.

Regenerate after changing any config dataclass:
    python -m batonserve.cluster.kube_schema > deploy/helm/batonserve/values.schema.json
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import types
import typing
from typing import Any, Union

from batonserve.cluster.config import ServeConfig
from batonserve.workers.plugins import CHOICES

JSON_SCHEMA_DRAFT = "http://json-schema.org/draft-07/schema#"
DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Constraints the Python types cannot say, keyed by path ("[]" stands for any list item).
# Some are stricter than `batonserve serve` needs because Kubernetes names and ports are involved.
EXTRA: dict[str, dict[str, Any]] = {
    "model": {"minLength": 1},
    "router.port": {"minimum": 1, "maximum": 65535},
    "router.http_port": {"minimum": 1, "maximum": 65535},
    "router.metrics_port": {"minimum": 1, "maximum": 65535},
    "pools": {"minItems": 1},
    "pools[].name": {
        "pattern": DNS_LABEL,
        "maxLength": 40,
        "description": "Pool name; also the KubeRay worker group name, so a DNS label "
        "(lower-case letters, digits, '-'), at most 40 characters.",
    },
    "pools[].replicas": {"minimum": 0},
    "pools[].min_replicas": {"minimum": 0},
    "pools[].max_replicas": {"minimum": 0},
    "pools[].num_cpus": {"minimum": 0},
    "pools[].num_gpus": {"minimum": 0},
    "pools[].resources": {"additionalProperties": {"type": "number", "minimum": 0}},
    "pools[].kubernetes.gpu_resource_name": {"minLength": 1},
    "kubernetes.image.repository": {"minLength": 1},
    "kubernetes.pod_disruption_budget.max_unavailable": {"minimum": 1},
    "kubernetes.head.startup_timeout_s": {"minimum": 10},
    "kubernetes.security_context.run_as_user": {
        "minimum": 1,
        "description": "Non-root user id (0 would break runAsNonRoot).",
    },
    "kubernetes.security_context.run_as_group": {"minimum": 0},
    "kubernetes.security_context.fs_group": {"minimum": 0},
    "kubernetes.model_cache.mount_path": {"pattern": "^/"},
    "kubernetes.monitoring.service_monitor.interval": {"pattern": "^[0-9]+(ms|s|m|h)$"},
    "kubernetes.monitoring.pod_monitor.interval": {"pattern": "^[0-9]+(ms|s|m|h)$"},
}


def _doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n")[0]


def _type_schema(tp: Any, path: str) -> dict[str, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        options = [_type_schema(a, path) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        out: dict[str, Any] = {"enum": list(args)}
        if kinds == {str}:
            out["type"] = "string"
        return out
    if origin is tuple:
        return {"type": "array", "items": _type_schema(args[0], f"{path}[]")}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], f"{path}.*")}
    if tp is Any:
        return {}
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp, path)  # type: ignore[arg-type]
    simple = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"{path}: no JSON Schema for field type {tp!r}")


def dataclass_schema(cls: type, path: str = "") -> dict[str, Any]:
    """JSON Schema of one config dataclass: its fields, nothing else (unknown keys are errors)."""
    hints = typing.get_type_hints(cls)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        sub = f"{path}.{f.name}" if path else f.name
        allowed = f.metadata.get(CHOICES)  # a `str` field naming a registered plug-in
        if allowed is not None:
            schema: dict[str, Any] = {"enum": list(allowed), "type": "string"}
        else:
            schema = _type_schema(hints[f.name], sub)
        schema.update(EXTRA.get(sub, {}))
        props[f.name] = schema
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    out: dict[str, Any] = {
        "type": "object",
        "description": _doc(cls),
        "properties": props,
        "additionalProperties": False,
    }
    if required:
        out["required"] = required
    return out


def values_schema() -> dict[str, Any]:
    """The whole values.schema.json document for the chart."""
    schema = dataclass_schema(ServeConfig)
    # Helm injects `global` when the chart is a subchart; the chart drops it from the rendered config.
    schema["properties"]["global"] = {"type": "object"}
    return {
        "$schema": JSON_SCHEMA_DRAFT,
        "title": "batonserve Helm values (a ServeConfig)",
        **schema,
    }


def render() -> str:
    """The schema as the committed file's text."""
    return json.dumps(values_schema(), indent=2) + "\n"


def main() -> int:
    """Print the schema (redirect it into the chart's values.schema.json)."""
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())

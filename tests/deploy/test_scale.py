"""`batonserve scale` against a local HTTP server speaking enough of the Kubernetes API."""

from __future__ import annotations

import argparse
import copy
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from chart_helpers import Docs, find

from batonserve.cluster import cli_scale
from batonserve.cluster.kube import ClusterRef, release_fullname, replica_patch
from batonserve.cluster.schema import ConfigError

NS, NAME = "serving", "rel-batonserve"
RC_PATH = f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/{NAME}"
PODS_PATH = f"/api/v1/namespaces/{NS}/pods"


def _apply_json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 test/replace/add, all or nothing, as the API server applies it to a CRD."""
    out = copy.deepcopy(obj)
    for op in ops:
        *parents, leaf = op["path"].lstrip("/").split("/")
        node: Any = out
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        key: Any = int(leaf) if isinstance(node, list) else leaf
        if op["op"] == "test":
            if node[key] != op["value"]:
                raise ValueError(f"test failed at {op['path']}")
        elif op["op"] == "replace":
            if key not in node:
                raise ValueError(f"replace of missing {op['path']}")
            node[key] = op["value"]
        elif op["op"] == "add":
            node[key] = op["value"]
        else:
            raise ValueError(f"unsupported op {op['op']}")
    return out


def _pod(name: str, node_type: str, group: str, ready: bool) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {
                "ray.io/cluster": NAME,
                "ray.io/node-type": node_type,
                "ray.io/group": group,
            },
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class FakeKube:
    """The API objects, and every PATCH received (content type and decoded body)."""

    def __init__(self, raycluster: dict[str, Any]) -> None:
        self.raycluster = raycluster
        self.pods = [
            _pod(f"{NAME}-head-x", "head", "headgroup", True),
            _pod(f"{NAME}-prefill-worker-a", "worker", "prefill", True),
            _pod(f"{NAME}-prefill-worker-b", "worker", "prefill", False),
            _pod(f"{NAME}-decode-worker-a", "worker", "decode", True),
        ]
        self.patches: list[tuple[str, Any]] = []
        self.gets: list[str] = []


def _handler(kube: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _status(self, code: int, message: str) -> None:
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
            self._send(code, {**body, "message": message, "code": code})

        def do_GET(self) -> None:
            url = urlparse(self.path)
            kube.gets.append(self.path)
            if url.path == RC_PATH:
                self._send(200, kube.raycluster)
            elif url.path == PODS_PATH:
                selector = parse_qs(url.query).get("labelSelector", [""])[0]
                assert selector == f"ray.io/cluster={NAME}"
                self._send(200, {"apiVersion": "v1", "kind": "PodList", "items": kube.pods})
            else:
                self._status(404, f"{url.path} not found")

        def do_PATCH(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers["Content-Length"])
            body = json.loads(self.rfile.read(length))
            ctype = self.headers["Content-Type"]
            kube.patches.append((ctype, body))
            if url.path != RC_PATH:
                return self._status(404, "not found")
            if ctype != "application/json-patch+json":
                return self._status(415, f"unsupported patch type {ctype} for a CRD")
            try:
                kube.raycluster = _apply_json_patch(kube.raycluster, body)
            except (ValueError, KeyError, IndexError) as e:
                return self._status(422, str(e))
            self._send(200, kube.raycluster)

    return Handler


@pytest.fixture
def kube(rendered: Callable[[str], Docs], tmp_path: Path) -> Iterator[tuple[FakeKube, Path]]:
    """A fake API server holding the chart's heterogeneous RayCluster, and a kubeconfig for it."""
    [rc] = find(rendered("heterogeneous"), "RayCluster")
    rc = copy.deepcopy(rc)
    rc["metadata"].update(namespace=NS, resourceVersion="1")
    rc["status"] = {"state": "ready"}
    fake = FakeKube(rc)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://{host}:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
                "contexts": [
                    {"name": "c", "context": {"cluster": "fake", "user": "u", "namespace": NS}}
                ],
                "current-context": "c",
            }
        )
    )
    try:
        yield fake, kubeconfig
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def scale(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli_scale.register(parser.add_subparsers())
    if "--name" not in argv and "--release" not in argv:
        argv = ("--release", "rel", *argv)  # the release the chart tests render
    args = parser.parse_args(["scale", *argv])
    return int(args.func(args))


def test_pool_flags_send_the_exact_json_patch(
    kube: tuple[FakeKube, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, kubeconfig = kube
    rc = scale("--kubeconfig", str(kubeconfig), "--release", "rel", "--pool", "prefill=3")
    rc2 = scale("--kubeconfig", str(kubeconfig), "--name", NAME, "--pool", "decode=8")
    assert rc == rc2 == 0
    assert fake.patches == [
        (
            "application/json-patch+json",
            [
                {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "prefill"},
                {"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 3},
            ],
        ),
        (
            "application/json-patch+json",
            [
                {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "decode"},
                # 8 is above maxReplicas 6, which KubeRay would clamp to: widen it first.
                {"op": "replace", "path": "/spec/workerGroupSpecs/1/maxReplicas", "value": 8},
                {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 8},
            ],
        ),
    ]
    groups = {g["groupName"]: g for g in fake.raycluster["spec"]["workerGroupSpecs"]}
    assert (groups["prefill"]["replicas"], groups["decode"]["replicas"]) == (3, 8)
    assert groups["mixed"]["replicas"] == 1  # untouched
    assert f"scaled raycluster {NS}/{NAME}: prefill=3" in capsys.readouterr().out


def test_plan_file_and_show(
    kube: tuple[FakeKube, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, kubeconfig = kube
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "pools:\n  prefill: {replicas: 4, machine: h100-80gb}\n"
        "  decode: {replicas: 0, machine: h100-80gb}\n"
        "summary: {throughput_rps: 12.5}\n"
    )
    assert scale("--kubeconfig", str(kubeconfig), "--plan", str(plan), "--show") == 0
    [(ctype, body)] = fake.patches
    assert ctype == "application/json-patch+json"
    assert body == [
        {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "prefill"},
        {"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": 4},
        {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "decode"},
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/minReplicas", "value": 0},
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 0},
    ]
    out, err = capsys.readouterr()
    # The plan's machine for decode is not what its pods run: said, not silently applied.
    assert "pool decode: the plan assumes machine 'h100-80gb'" in err
    assert "pool prefill" not in err
    scaled, *table = out.splitlines()
    assert scaled == f"scaled raycluster {NS}/{NAME}: prefill=4, decode=0"
    assert table[1].split() == ["POOL", "ROLE", "ACCEL", "DESIRED", "MIN", "MAX", "PODS", "READY"]
    assert table[2].split() == ["prefill", "prefill", "H100", "4", "1", "8", "2", "1"]
    assert table[3].split() == ["decode", "decode", "A100-80G", "0", "0", "6", "1", "1"]
    assert "state ready, head ready" in table[0]


def test_show_and_dry_run_send_no_patch(
    kube: tuple[FakeKube, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, kubeconfig = kube
    assert scale("--kubeconfig", str(kubeconfig), "--show") == 0
    assert "mixed" in capsys.readouterr().out
    assert scale("--kubeconfig", str(kubeconfig), "--pool", "mixed=2", "--dry-run") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[-1] == {"op": "replace", "path": "/spec/workerGroupSpecs/2/replicas", "value": 2}
    assert scale("--kubeconfig", str(kubeconfig), "--pool", "mixed=1") == 0  # already 1
    assert fake.patches == []
    assert any(g.startswith(RC_PATH) for g in fake.gets)


def test_errors_are_clear(kube: tuple[FakeKube, Path], capsys: pytest.CaptureFixture[str]) -> None:
    fake, kubeconfig = kube
    with pytest.raises(ConfigError, match=r"pool 'encode'.*prefill, decode, mixed"):
        scale("--kubeconfig", str(kubeconfig), "--pool", "encode=2")
    with pytest.raises(ConfigError, match="NAME=REPLICAS"):
        scale("--kubeconfig", str(kubeconfig), "--pool", "decode=-1")
    assert scale("--kubeconfig", str(kubeconfig), "--name", "nope", "--show") == 1
    assert f"raycluster {NS}/nope not found" in capsys.readouterr().err
    assert scale("--kubeconfig", "/nonexistent/kubeconfig", "--show") == 1
    assert "kubeconfig /nonexistent/kubeconfig:" in capsys.readouterr().err
    assert fake.patches == []


def test_patch_is_guarded_against_a_reordered_list() -> None:
    obj = {
        "spec": {
            "workerGroupSpecs": [
                {"groupName": "a", "minReplicas": 0, "maxReplicas": 4},  # no replicas yet
                {"groupName": "b", "replicas": 2, "minReplicas": 2, "maxReplicas": 4},
            ]
        }
    }
    ops = replica_patch(obj, {"a": 1, "b": 1})
    assert ops == [
        {"op": "test", "path": "/spec/workerGroupSpecs/0/groupName", "value": "a"},
        {"op": "add", "path": "/spec/workerGroupSpecs/0/replicas", "value": 1},
        {"op": "test", "path": "/spec/workerGroupSpecs/1/groupName", "value": "b"},
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/minReplicas", "value": 1},
        {"op": "replace", "path": "/spec/workerGroupSpecs/1/replicas", "value": 1},
    ]
    reordered = {"spec": {"workerGroupSpecs": list(reversed(obj["spec"]["workerGroupSpecs"]))}}
    with pytest.raises(ValueError, match="test failed"):
        _apply_json_patch(reordered, ops)
    assert release_fullname("prod") == "prod-batonserve"
    assert release_fullname("batonserve") == "batonserve"
    assert str(ClusterRef("ns", "x")) == "raycluster ns/x"

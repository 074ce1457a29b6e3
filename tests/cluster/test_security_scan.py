"""Source scans: nothing received from the network is unpickled; the only listeners are the
router's gRPC port and the metrics endpoint; a local Ray instance binds to 127.0.0.1 only."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("cluster", "workers", "proto", "kernels")

# Modules whose loaders run code found in the data they read.
UNSAFE_MODULES = {
    "pickle",
    "_pickle",
    "cPickle",
    "cloudpickle",
    "dill",
    "marshal",
    "shelve",
    "jsonpickle",
    "joblib",
}
# torch.distributed's *_object* collectives pickle what they carry.
PICKLING_CALLS = {
    "recv_object_list",
    "broadcast_object_list",
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
    "unsafe_load",
    "full_load",
}
# Where something listens for the network, and the only places allowed to.
LISTENERS = {
    "server",
    "start_http_server",
    "start_server",
    "HTTPServer",
    "ThreadingHTTPServer",
    "create_server",
    "socket",
    "bind",
    "listen",
    "TCPStore",
    "init_process_group",
}
NETWORK_MODULES = (
    "grpc",
    "socket",
    "asyncio",
    "http",
    "socketserver",
    "prometheus_client",
    "aiohttp",
    "uvicorn",
    "dist",
    "torch.distributed",
)
ALLOWED_LISTENERS = {
    # Client-facing: the router's gRPC port (protobuf only) and Prometheus metrics (GET only).
    ("cluster/router/server.py", "server"),
    ("cluster/metrics.py", "start_http_server"),
    # An attached router's metrics: its own series merged with the cluster actor's (GET only).
    ("cluster/metrics_remote.py", "start_http_server"),
}
# Cluster-internal rendezvous (KV transfer, sequence-parallel groups): torch.distributed's
# TCPStore and process groups carry raw tensors and bytes, never pickles; they bind the node
# address, and the Helm chart's NetworkPolicy admits only the release's own pods.
CLUSTER_INTERNAL = {"TCPStore", "init_process_group"}


def _sources() -> Iterator[tuple[str, ast.Module]]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "_pb2" in path.name:
                continue  # generated protobuf code
            rel = path.relative_to(ROOT).as_posix()
            yield rel, ast.parse(path.read_text(), rel)


def _name(node: ast.expr) -> str:
    """Dotted name of a call target (a.b.c); a part that is not a name is empty."""
    if isinstance(node, ast.Call):
        return f"{_name(node.func)}()"  # socket.socket().bind -> "socket.socket().bind"
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"  # `f().eval` is ".eval", not the builtin
    return node.id if isinstance(node, ast.Name) else ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def test_the_scan_sees_the_sources() -> None:
    files = dict(_sources())
    assert "cluster/router/handlers.py" in files and "workers/engine.py" in files
    assert len(files) > 50


def test_nothing_is_unpickled() -> None:
    found = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for m in mods:
                    if m.split(".")[0] in UNSAFE_MODULES:
                        found.append(f"{rel}:{node.lineno} imports {m}")
            if not isinstance(node, ast.Call):
                continue
            name = _name(node.func)
            last = name.rsplit(".", 1)[-1]
            if last in PICKLING_CALLS:
                found.append(f"{rel}:{node.lineno} calls {name}")
            if name in ("eval", "exec"):
                found.append(f"{rel}:{node.lineno} calls {name}")
            if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
                found.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
            if last == "load" and _is_true(_kw(node, "allow_pickle")):
                found.append(f"{rel}:{node.lineno} numpy load with allow_pickle=True")
            if name == "yaml.load":
                loader = _name(_kw(node, "Loader") or ast.Name(""))
                if "Safe" not in loader:
                    found.append(f"{rel}:{node.lineno} yaml.load without a safe loader")
    assert found == [], "\n".join(found)


def test_only_the_router_and_metrics_listen() -> None:
    found, internal = set(), set()
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _name(node.func)
                last = name.rsplit(".", 1)[-1]
                if last in LISTENERS and name.startswith(NETWORK_MODULES):
                    if last in CLUSTER_INTERNAL and name.startswith(("dist", "torch.distributed")):
                        internal.add(rel)
                    else:
                        found.add((rel, last))
    assert found == ALLOWED_LISTENERS
    # Every cluster-internal rendezvous lives in the data plane or the cluster runtime.
    assert internal and all(r.startswith(("workers/", "cluster/")) for r in internal), internal


def test_router_parses_requests_with_protobuf_only() -> None:
    # Every request_deserializer the router registers comes from handlers._safe_parser, which
    # calls the message class's FromString (protobuf: data, never code).
    src = (ROOT / "cluster/router/handlers.py").read_text()
    tree = ast.parse(src)
    parser = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_safe_parser"
    )
    assert "cls.FromString(data)" in ast.unparse(parser)
    deserializers = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "request_deserializer":
                deserializers.append((rel, ast.unparse(node.value)))
    assert deserializers, "no request_deserializer found: the scan is stale"
    for rel, value in deserializers:
        assert rel.startswith("cluster/router/"), (rel, value)
        assert value in ("parse", "handler.request_deserializer"), (rel, value)


def test_a_local_ray_instance_binds_loopback() -> None:
    # Joining a cluster (address=...) uses that cluster's addresses; starting one must not
    # bind the machine's external address.
    inits = []
    for rel, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) == "ray.init":
                inits.append((rel, node))
    assert inits
    for rel, call in inits:
        if _kw(call, "address") is not None:
            continue
        ip = _kw(call, "_node_ip_address") or _kw(call, "node_ip_address")
        assert isinstance(ip, ast.Constant) and ip.value == "127.0.0.1", rel
        dash = _kw(call, "include_dashboard")
        assert dash is not None, f"{rel}: say whether the dashboard (jobs API) starts"

"""What each process may import: a router is a light front end (no torch, no Ray until it
connects), the planner and the schedulers are pure Python, and model code never talks to Ray or
gRPC. Each group is checked in a fresh interpreter (nothing imported by other tests hides a leak),
every module of a package found by walking its folder, so a new file is checked without a list."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# Packages walked in full, and single modules of the router process outside them.
LIGHT = [
    "batonserve.cluster.router",
    "batonserve.cluster.scheduling",
    "batonserve.cluster.sim",
    "batonserve.workers.scheduler",
    "batonserve.cluster.cli_serve",
    "batonserve.cluster.config",
    "batonserve.cluster.metrics",
    "batonserve.cluster.model_meta",
]
MODEL_CODE = ["batonserve.kernels", "batonserve.workers.models"]

# Runs in the child: lists every module under each root without importing it, imports them one by
# one, and after each names the watched packages that import pulled in first, with the chain of
# this repository's frames that asked for them (the first offender is the one to fix).
CHILD = """
import importlib, importlib.util, json, os, pkgutil, sys, traceback
roots, watch, repo = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
chains = {}
found = {}

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name in watch and name not in chains:
            frames = traceback.extract_stack()[:-1]
            chains[name] = [f"{f.filename}:{f.lineno}" for f in frames if f.filename.startswith(repo)]
        return None

def walk(name, paths):
    # iter_modules reads folders only (walk_packages would import each subpackage first).
    for info in pkgutil.iter_modules(paths):
        yield f"{name}.{info.name}"
        if info.ispkg:
            yield from walk(f"{name}.{info.name}", [os.path.join(p, info.name) for p in paths])

sys.meta_path.insert(0, Spy())
names = []
for root in roots:
    spec = importlib.util.find_spec(root)  # imports the parent packages only
    names += [root, *walk(root, spec.submodule_search_locations or [])]
early = sorted(w for w in watch if w in sys.modules)
if early:
    found["(parent packages)"] = {w: chains.get(w, []) for w in early}
for name in names:
    before = {w for w in watch if w in sys.modules}
    importlib.import_module(name)
    new = sorted(w for w in watch if w in sys.modules and w not in before)
    if new:
        found[name] = {w: chains.get(w, []) for w in new}
print(json.dumps({"checked": names, "found": found}))
"""


def _pulled_in(roots: list[str], watch: list[str]) -> tuple[list[str], dict[str, object]]:
    """(modules checked, {module: {watched package: import chain}}) from a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(roots), json.dumps(watch), str(TESTS.parent)],
        cwd=TESTS,  # not the repository root: its folders would shadow packages
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    return result["checked"], result["found"]


@pytest.mark.parametrize("root", LIGHT)
def test_router_planner_and_schedulers_import_neither_torch_nor_ray(root: str) -> None:
    checked, found = _pulled_in([root], ["torch", "ray"])
    assert root in checked
    assert found == {}, json.dumps(found, indent=1)


@pytest.mark.parametrize("root", MODEL_CODE)
def test_model_code_imports_neither_ray_nor_grpc(root: str) -> None:
    checked, found = _pulled_in([root], ["ray", "grpc"])
    assert len(checked) > 5, checked  # the walk found the package's modules
    assert found == {}, json.dumps(found, indent=1)


def test_router_checks_a_config_without_torch() -> None:
    """Loading and checking a config (the ring and TP checks included) stays torch-free."""
    code = (
        "import sys\n"
        "from batonserve.cluster.config import load_config\n"
        "cfg = load_config(None, {'sequence_parallel.enabled': True})\n"
        "assert cfg.pools\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=TESTS, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout

"""What each process may import: a router is a light front end (no torch, no Ray until it
connects), the planner and the schedulers are pure Python, and model code never talks to Ray or
gRPC. Each check runs in a fresh interpreter, so nothing imported by other tests hides a leak."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LIGHT = [
    "batonserve.cluster.router.app",
    "batonserve.cluster.router.server",
    "batonserve.cluster.router.openai_server",
    "batonserve.cluster.cli_serve",
    "batonserve.cluster.config",
    "batonserve.cluster.metrics",
    "batonserve.cluster.model_meta",
    "batonserve.cluster.scheduling",
    "batonserve.cluster.sim.simulator",
    "batonserve.cluster.sim.planner",
    "batonserve.workers.scheduler",
]
MODEL_CODE = [
    "batonserve.kernels.attention",
    "batonserve.kernels.dispatch",
    "batonserve.kernels.linear",
    "batonserve.kernels.moe",
    "batonserve.kernels.ring",
    "batonserve.workers.models.registry",
    "batonserve.workers.models.llama",
    "batonserve.workers.models.mixtral",
    "batonserve.workers.models.qwen2_moe",
    "batonserve.workers.models.loader",
]


def _loaded_after(modules: list[str], watch: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(' '.join(w for w in {watch!r} if w in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO / "tests",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()


@pytest.mark.parametrize("module", LIGHT)
def test_router_planner_and_schedulers_import_neither_torch_nor_ray(module: str) -> None:
    assert _loaded_after([module], ["torch", "ray"]) == []


def test_model_code_imports_neither_ray_nor_grpc() -> None:
    assert _loaded_after(MODEL_CODE, ["ray", "grpc"]) == []

"""`batonserve serve` start-up as a user meets it: more workers than cores start and serve; pools
the cluster cannot hold, and workers that never come up, fail start-up with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from testkit.serve_process import Server, cli, serve_config

from batonserve.cluster.config import PoolConfig
from batonserve.cluster.placement import StartupError, check_pools_fit, local_num_cpus


def test_local_ray_grows_to_the_pools() -> None:
    pools = [PoolConfig("p", "prefill", replicas=1), PoolConfig("d", "decode", replicas=3)]
    assert local_num_cpus(pools, cores=2) == 4
    assert local_num_cpus(pools, cores=16) == 16
    assert local_num_cpus([PoolConfig("d", "decode", replicas=3, num_cpus=0.5)], cores=1) == 2


def test_fit_check_names_the_pool_and_the_shortfall() -> None:
    nodes = [{"CPU": 2.0, "memory": 1e9, "node:127.0.0.1": 1.0}]
    check_pools_fit([PoolConfig("p", "prefill"), PoolConfig("d", "decode")], nodes)
    with pytest.raises(StartupError) as e:
        check_pools_fit(
            [PoolConfig("p", "prefill"), PoolConfig("gpu", "decode", num_gpus=1)], nodes
        )
    msg = str(e.value)
    assert "pool 'gpu'" in msg and "GPU=1" in msg and "has {CPU=2}" in msg, msg
    with pytest.raises(StartupError, match=r"pool 'd'.*only 1 of its 2 fit"):
        check_pools_fit([PoolConfig("p", "prefill"), PoolConfig("d", "decode", replicas=2)], nodes)
    with pytest.raises(StartupError, match=r"pool 'x'.*accelerator_type:H100"):
        check_pools_fit([PoolConfig("x", "decode", accelerator_type="H100")], nodes)
    # Two 1-GPU nodes hold two 1-GPU workers, not one 2-GPU worker.
    two = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    check_pools_fit([PoolConfig("d", "decode", replicas=2, num_gpus=1)], two)
    with pytest.raises(StartupError, match="pool 'd'"):
        check_pools_fit([PoolConfig("d", "decode", num_gpus=2)], two)


@pytest.mark.cluster
@pytest.mark.parametrize("prefill,decode", [(1, 2), (2, 2)])
def test_more_workers_than_cores_start_and_serve(tmp_path: Path, prefill: int, decode: int) -> None:
    """The issue's case: 1+2 (and 2+2) workers on the local default of a 2-core machine."""
    flags = ["--prefill-workers", str(prefill), "--decode-workers", str(decode)]
    server = Server(["--config", serve_config(tmp_path), *flags], cpus=2)
    try:
        server.wait_for(r"batonserve: ready", timeout=300)
        port = server.wait_for(r"router listening on 127\.0\.0\.1:(\d+)", 5).group(1)
        out = cli("generate", "--target", f"127.0.0.1:{port}", "--max-tokens", "6", "--json", "x =")
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["token_ids"]) == 6
        status = cli("status", "--target", f"127.0.0.1:{port}")
        assert status.returncode == 0, status.stderr
        assert f"decode-{decode - 1}" in status.stdout and f"prefill-{prefill - 1}" in status.stdout
    finally:
        assert server.stop() == 0, "\n".join(server.lines)


@pytest.mark.cluster
def test_gpu_pool_without_gpu_fails_fast(tmp_path: Path) -> None:
    """A GPU pool on a machine without one: exit 1 naming the pool, long before any timeout."""
    pools = """
pools:
  - {name: prefill, role: prefill}
  - {name: gpu-decode, role: decode, num_gpus: 1}
"""
    out = cli("serve", "--config", serve_config(tmp_path, pools), timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "pool 'gpu-decode'" in out.stderr and "GPU=1" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.cluster
def test_worker_that_never_starts_fails_with_rays_reason(tmp_path: Path) -> None:
    """Waiting for an autoscaler that never comes: the bound ends it, saying what is pending."""
    pools = """
pools:
  - {name: special, role: decode, resources: {special_chip: 1}}
"""
    ray = "  wait_for_resources: true\n  worker_start_timeout_s: 12\n"
    cfg = serve_config(tmp_path, pools, ray)
    out = cli("serve", "--config", cfg, timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr
    err = out.stderr
    assert "worker special-0 (pool 'special') not ready after 12s" in err, err
    assert "pending creation" in err and "special_chip=1" in err, err
    assert "waiting for worker special-0" in out.stdout, out.stdout  # progress while it waited


@pytest.mark.cluster
def test_worker_that_crashes_fails_with_its_error(tmp_path: Path) -> None:
    """A model directory without weights: the router reads its config, the worker cannot load it."""
    bundled = Path(__file__).resolve().parents[3] / "workers" / "models" / "bundled" / "demo"
    model = tmp_path / "no-weights"
    model.mkdir()
    for f in bundled.glob("*.json"):
        shutil.copy(f, model / f.name)
    cfg = serve_config(tmp_path, "pools:\n  - {name: decode, role: decode}\n")
    out = cli("serve", "--config", cfg, "--model", str(model), timeout=180)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "worker decode-0 (pool 'decode') failed to start:" in out.stderr, out.stderr
    assert "safetensors" in out.stderr.splitlines()[-1], out.stderr

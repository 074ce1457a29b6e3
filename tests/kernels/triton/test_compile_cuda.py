"""Every Triton kernel compiles for CUDA (sm_90 bf16, sm_80 fp32) without a GPU: the paths the interpreter skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_cuda_targets(tmp_path: Path) -> None:
    """Ahead-of-time build to cubin (ptxas from the triton wheel), in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a real compile, not a cache hit from a previous run
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated (silences its warning)
    cmd = [sys.executable, "-m", "batonserve.kernels.triton.compile_check"]
    cmd += ["--target", "90:bfloat16", "--target", "80:float32"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("sm_")]
    assert len(lines) == 14, done.stdout  # 7 kernels x 2 targets
    assert all(int(ln.split("cubin")[1].split()[0]) > 0 for ln in lines)

"""The dispatch rule: Triton on CUDA for supported dtypes when triton imports; the reference elsewhere."""

from __future__ import annotations

import torch

from batonserve.kernels import dispatch
from batonserve.kernels.dispatch import HALF_AND_FLOAT, Backend, choose_backend, use_triton


def test_cpu_takes_reference() -> None:
    """CPU tensors never run Triton, whatever the dtype or triton's presence."""
    for dtype in HALF_AND_FLOAT:
        assert choose_backend("cpu", dtype, HALF_AND_FLOAT, triton_ok=True) is Backend.TORCH


def test_cuda_supported_dtype_takes_triton() -> None:
    """A CUDA tensor of a supported dtype runs Triton when triton imports."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert choose_backend("cuda", dtype, HALF_AND_FLOAT, triton_ok=True) is Backend.TRITON


def test_unsupported_dtype_missing_triton_or_disabled_take_reference() -> None:
    """float64 / int, a missing triton, other devices and the off switch all fall back."""
    assert choose_backend("cuda", torch.float64, HALF_AND_FLOAT, triton_ok=True) is Backend.TORCH
    assert choose_backend("cuda", torch.int8, HALF_AND_FLOAT, triton_ok=True) is Backend.TORCH
    assert choose_backend("cuda", torch.float16, HALF_AND_FLOAT, triton_ok=False) is Backend.TORCH
    assert choose_backend("mps", torch.float16, HALF_AND_FLOAT, triton_ok=True) is Backend.TORCH
    assert (
        choose_backend("cuda", torch.bfloat16, HALF_AND_FLOAT, triton_ok=True, enabled=False)
        is Backend.TORCH
    )


def test_use_triton_false_for_cpu_tensors() -> None:
    """Real CPU tensors go to the reference, and the switch round-trips."""
    x = torch.zeros(2, 2)
    assert not use_triton(x)
    dispatch.set_triton_enabled(False)
    try:
        assert not use_triton(x)
    finally:
        dispatch.set_triton_enabled(True)


def test_missing_triton_means_reference(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Without an importable triton, triton_available() is False (and the rule picks the reference)."""
    import sys

    dispatch.triton_available.cache_clear()
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    try:
        assert not dispatch.triton_available()
    finally:
        dispatch.triton_available.cache_clear()


def test_references_do_not_import_triton() -> None:
    """The kernels' references (and the engine's use of them on CPU) never import triton."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from batonserve.kernels import attention, moe, norm\n"
        "x = torch.randn(3, 8)\n"
        "norm.rms_norm(x, torch.ones(8), 1e-6)\n"
        "moe.topk_routing(x, 2)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_any_device_switch_routes_cpu_tensors() -> None:
    """any_device (the interpreter test mode) sends CPU tensors of supported dtypes to Triton."""
    assert (
        choose_backend("cpu", torch.float32, HALF_AND_FLOAT, triton_ok=True, any_device=True)
        is Backend.TRITON
    )
    assert (
        choose_backend("cpu", torch.float64, HALF_AND_FLOAT, triton_ok=True, any_device=True)
        is Backend.TORCH
    )

"""Choose, per call, between a Triton fast path and the torch reference.

Triton runs when the tensor is on CUDA, its dtype is one the kernel supports and `triton` imports;
everything else (CPU, MPS, float64, no triton installed) takes the reference. `choose_backend` is
the pure rule (testable without a GPU); `use_triton` applies it to a real tensor.
"""

from __future__ import annotations

import functools
import importlib
from enum import Enum

import torch

HALF_AND_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32})


class Backend(str, Enum):
    """Which implementation of a kernel runs."""

    TRITON = "triton"
    TORCH = "torch"


_enabled = True
_any_device = False


def set_triton_enabled(enabled: bool, *, any_device: bool = False) -> None:
    """Turn the Triton fast paths on or off process-wide (off: references everywhere, for A/B checks).

    any_device=True also sends CPU tensors to Triton: only meaningful under TRITON_INTERPRET=1,
    where it runs a whole model through the kernels on CPU (tests).
    """
    global _enabled, _any_device
    _enabled, _any_device = enabled, any_device


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when `triton` imports (it is an optional dependency; CPU installs may lack it)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install failing while it loads its driver
        return False
    return True


def choose_backend(
    device_type: str,
    dtype: torch.dtype,
    supported: frozenset[torch.dtype],
    *,
    triton_ok: bool,
    enabled: bool = True,
    any_device: bool = False,
) -> Backend:
    """The dispatch rule: Triton iff enabled, on CUDA (or any_device), dtype supported, triton imports."""
    on_device = device_type == "cuda" or any_device
    if enabled and on_device and dtype in supported and triton_ok:
        return Backend.TRITON
    return Backend.TORCH


def use_triton(x: torch.Tensor, supported: frozenset[torch.dtype] = HALF_AND_FLOAT) -> bool:
    """Apply `choose_backend` to tensor x (checks triton only for CUDA tensors: CPU never imports it)."""
    if not _enabled or (x.device.type != "cuda" and not _any_device):
        return False
    backend = choose_backend(
        x.device.type, x.dtype, supported, triton_ok=triton_available(), any_device=_any_device
    )
    return backend is Backend.TRITON

"""Run the Triton kernel tests on CPU with Triton's interpreter unless a CUDA GPU is present.

TRITON_INTERPRET must be set before the kernel modules are imported (triton.jit reads it at
decoration time); this conftest is imported before the test modules of this folder. On a CUDA box
the tests run the compiled kernels on the GPU instead; `TRITON_INTERPRET=1` forces the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CPU tensors under the interpreter, else the GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    return torch.device("cuda")

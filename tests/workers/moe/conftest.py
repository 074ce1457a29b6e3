"""MoE-scheduling test fixtures: the bundled demo-moe model, its all-resident reference run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # moe_helpers

torch.set_num_threads(1)

from moe_helpers import PROMPTS, ResidentRun, resident_run  # noqa: E402 (after sys.path)


@pytest.fixture(scope="session")
def reference() -> ResidentRun:
    """Greedy decode of PROMPTS on the all-resident demo-moe, with its routing trace."""
    return resident_run(PROMPTS, max_new_tokens=12)

"""MoE-scheduling test fixtures: the bundled demo-moe model, its all-resident reference run."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

from moe_helpers import PROMPTS, ResidentRun, resident_run  # noqa: E402 (after set_num_threads)


@pytest.fixture(scope="session")
def reference() -> ResidentRun:
    """Greedy decode of PROMPTS on the all-resident demo-moe, with its routing trace."""
    return resident_run(PROMPTS, max_new_tokens=12)

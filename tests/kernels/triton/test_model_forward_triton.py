"""A whole model forward through the Triton kernels (interpreter on CPU) equals the reference forward.

The dispatch is switched to "any device", so every attention, RMSNorm, router and expert FFN call
of the engine's model runner takes its Triton path: this checks the plumbing (plans carry the
lengths, dtype and device checks, output layouts) on prefill, mixed prefill+decode and decode steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testkit.hf_tiny import make_tiny_model
from testkit.paged_batch import PagedSeqs

from batonserve.kernels import dispatch
from batonserve.workers.config import EngineConfig
from batonserve.workers.model_runner import ModelRunner

torch.set_num_threads(1)


def _steps(runner: ModelRunner) -> list[torch.Tensor]:
    """Prefill two prompts, a mixed step (decode one, prefill-chunk the other), then decode both."""
    seqs = PagedSeqs(block_size=4, num_blocks=24, seed=3)
    a, b = seqs.add(), seqs.add()
    out = [runner.execute(seqs.step({a: [5, 9, 13, 2, 7, 11, 3], b: [4, 8, 15]}, all_logits=True))]
    out.append(runner.execute(seqs.step({a: [21], b: [16, 23, 42, 30, 6]}, all_logits=True)))
    for tok in (17, 19):
        out.append(runner.execute(seqs.step({a: [tok], b: [tok + 1]})))
    return out


@pytest.mark.parametrize(
    ("arch", "overrides"), [("llama", {}), ("mixtral", {}), ("mistral", {"sliding_window": 5})]
)
def test_model_logits_match_reference(
    tmp_path: Path, device: torch.device, arch: str, overrides: dict[str, int]
) -> None:
    """Llama (dense), Mixtral (router + grouped experts), Mistral with a sliding window: 2 layers each."""
    model_dir = make_tiny_model(arch, tmp_path / arch, num_hidden_layers=2, **overrides)
    # float32 on both sides ("auto" may pick bf16 on CPU): the tolerance is float32's.
    cfg = EngineConfig(dtype="float32", num_kv_blocks=24, block_size=4, device=device.type)
    ref = _steps(
        ModelRunner(model_dir, EngineConfig(dtype="float32", num_kv_blocks=24, block_size=4))
    )
    dispatch.set_triton_enabled(True, any_device=device.type == "cpu")
    try:
        got = _steps(ModelRunner(model_dir, cfg))
    finally:
        dispatch.set_triton_enabled(True)
    for r, g in zip(ref, got, strict=True):
        torch.testing.assert_close(g.cpu(), r, atol=2e-4, rtol=2e-4)

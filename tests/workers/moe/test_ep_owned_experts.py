"""Expert-parallel ranks read only the experts they own; the runner never loads the others."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.decode import greedy_decode
from batonserve.workers.expert_store.disk import DiskTier
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.parallel import ep_serving, expert_parallel

KW = dict(device="cpu", dtype="float32", num_kv_blocks=16, block_size=4)


def test_rank_reads_only_its_experts(
    tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of 2 (group faked at construction): its slice holds checkpoint experts 4..7 and only
    those were read."""
    path = tiny_model("mixtral")
    monkeypatch.setattr(expert_parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(expert_parallel.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(expert_parallel.dist, "get_rank", lambda group=None: 1)
    reads: list[tuple[int, int]] = []
    real_read = DiskTier.read

    def counting_read(self: DiskTier, key):  # type: ignore[no-untyped-def]
        reads.append(tuple(key))
        return real_read(self, key)

    monkeypatch.setattr(DiskTier, "read", counting_read)
    runner, blocks = ep_serving._build_rank(path, EngineConfig(**KW, expert_parallel_size=2))  # type: ignore[arg-type]
    assert sorted(reads) == [(layer, e) for layer in range(2) for e in range(4, 8)]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        w1 = f.get_tensor("model.layers.1.block_sparse_moe.experts.5.w1.weight")
        w2 = f.get_tensor("model.layers.1.block_sparse_moe.experts.5.w2.weight")
    ep = blocks[1].ep
    assert torch.equal(ep.w_gate_up[1, : w1.shape[0]], w1) and torch.equal(ep.w_down[1], w2)
    assert not any(p.is_meta for p in runner.model.parameters())


def test_single_rank_group_decodes_like_plain_runner(tiny_model: Callable[[str], Path]) -> None:
    """A group of one (no process group): same greedy tokens as the plain runner."""
    path = tiny_model("mixtral")
    prompts = [[5, 17, 301, 42], [3, 5, 6]]
    ref = greedy_decode(ModelRunner(path, EngineConfig(**KW)), prompts, 5)  # type: ignore[arg-type]
    runner, _ = ep_serving._build_rank(path, EngineConfig(**KW, expert_parallel_size=2))  # type: ignore[arg-type]
    assert greedy_decode(runner, prompts, 5).tokens == ref.tokens

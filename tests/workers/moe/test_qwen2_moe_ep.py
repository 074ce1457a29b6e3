"""Expert parallelism for Qwen2-MoE: each of 2 gloo ranks (127.0.0.1) builds its rank the way an
EP worker does (`ep_serving._build_rank`: no expert loaded, then only its own experts read), with
the shared expert and its gate replicated, and decodes the same tokens as the single runner.

Two tiny models cover both routing modes and a dense layer between MoE layers: the default
(norm_topk_prob false, shared expert) and norm_topk_prob true with layer 0 dense.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testkit.hf_tiny import make_tiny_model
from testkit.ports import free_port

from batonserve.workers.config import EngineConfig
from batonserve.workers.expert_store.decode import greedy_decode
from batonserve.workers.model_runner import ModelRunner
from batonserve.workers.parallel import ep_serving
from batonserve.workers.parallel.ep_slice import SlicedEPMoE

PROMPTS = [[5, 17, 301, 42, 9, 100, 77], [3, 5, 6, 7], [8, 222, 33, 44, 55]]  # 16 rows: uneven
KW = dict(device="cpu", dtype="float32", num_kv_blocks=32, block_size=4)
VARIANTS = {"shared": {}, "norm_dense": {"norm_topk_prob": True, "mlp_only_layers": [0]}}


def _worker(rank: int, world: int, port: int, models: dict[str, str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    out: dict[str, object] = {}
    try:
        for name, path in models.items():
            ref = greedy_decode(ModelRunner(Path(path), EngineConfig(**KW)), PROMPTS, 6, True)  # type: ignore[arg-type]
            cfg = EngineConfig(**KW, expert_parallel_size=world)  # type: ignore[arg-type]
            runner, blocks = ep_serving._build_rank(Path(path), cfg)
            got = greedy_decode(runner, PROMPTS, 6, keep_logits=True)
            out[name] = {
                "tokens": got.tokens == ref.tokens,
                "diff": max(
                    float((a - b).abs().max()) for a, b in zip(got.logits, ref.logits, strict=True)
                ),
                "sharded_layers": [
                    i for i, layer in enumerate(runner.model.layers) if layer.mlp in blocks
                ],
                "shared": all(b.ep.shared is not None for b in blocks),
                "renormalize": [b.ep.renormalize for b in blocks],
                "local_experts": int(blocks[0].ep.w_gate_up.shape[0]),
            }
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ep2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict]]:
    """Both ranks' findings, per model variant."""
    root = tmp_path_factory.mktemp("qwen2-moe-ep")
    models = {n: str(make_tiny_model("qwen2_moe", root / n, **o)) for n, o in VARIANTS.items()}
    mp.spawn(_worker, args=(2, free_port(), models, str(root)), nprocs=2, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_qwen2_moe_ep2_same_tokens(ep2: list[dict[str, dict]], variant: str) -> None:
    """Same greedy tokens as the single runner on both ranks; fp32 logits equal to GEMM rounding."""
    for res in ep2:
        r = res[variant]
        assert r["tokens"]
        assert r["diff"] < 1e-4
        assert r["shared"] and r["local_experts"] == 4  # 8 experts over 2 ranks


def test_qwen2_moe_ep2_routing_modes_and_dense_layers(ep2: list[dict[str, dict]]) -> None:
    """norm_topk_prob reaches the shards; a dense layer stays local and is not sharded."""
    for res in ep2:
        assert res["shared"]["renormalize"] == [False, False]
        assert res["shared"]["sharded_layers"] == [0, 1]
        assert res["norm_dense"]["renormalize"] == [True]
        assert res["norm_dense"]["sharded_layers"] == [1]


def test_ep_shards_are_sliced_moe(tmp_path: Path) -> None:
    """A group of one (no process group) over Qwen2-MoE: every MoE layer becomes a SlicedEPMoE
    holding all experts, and decodes like the plain runner."""
    path = make_tiny_model("qwen2_moe", tmp_path / "m")
    ref = greedy_decode(ModelRunner(path, EngineConfig(**KW)), PROMPTS, 4)  # type: ignore[arg-type]
    runner, blocks = ep_serving._build_rank(path, EngineConfig(**KW, expert_parallel_size=2))  # type: ignore[arg-type]
    assert all(isinstance(b, SlicedEPMoE) for b in blocks) and len(blocks) == 2
    assert greedy_decode(runner, PROMPTS, 4).tokens == ref.tokens

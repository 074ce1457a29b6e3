"""Expert parallelism over 2 gloo processes on 127.0.0.1 (and size 1 without a group).

One spawn runs every check (process start-up dominates); each rank writes its findings to a JSON
file the test then asserts on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from testkit.ports import free_port

from batonserve.kernels.moe import moe_swiglu
from batonserve.workers.parallel.ep_tuner import EPSettings, EPTuner
from batonserve.workers.parallel.expert_parallel import ExpertParallelMoE, attach_expert_parallel

SETTINGS = [EPSettings(o, cf) for o in (1, 2, 4) for cf in (0.0, 0.5, 1.25)]
TOKENS = [(7, 0), (13, 3), (1, 9), (0, 0), (16, 16)]  # (rank 0, rank 1) tokens; empty ranks too


def _weights(e: int = 8, d: int = 32, i: int = 16):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(e, d, generator=g),
        torch.randn(e, 2 * i, d, generator=g) * 0.2,
        torch.randn(e, d, i, generator=g) * 0.2,
    )


def _block_checks(rank: int, world: int) -> dict[str, object]:
    """EP block vs single-process moe_swiglu for every setting and token split (fp32)."""
    gate, wgu, wd = _weights()
    block = ExpertParallelMoE(gate, wgu, wd, top_k=2)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for split in TOKENS:
        xs = [torch.randn(n, gate.shape[1], generator=g) for n in split]
        x = xs[rank] if world > 1 else torch.cat(xs)
        ref = moe_swiglu(x, F.linear(x, gate), wgu, wd, 2)
        for s in SETTINGS:
            y = block(x, s)
            assert y.shape == ref.shape
            if y.numel():
                worst = max(worst, float((y - ref).abs().max()))
    # the tuner switching settings between forwards leaves outputs unchanged
    tuner = EPTuner([*SETTINGS[:3], EPSettings(2, 1.25)], samples_per_candidate=1, probe_every=2)
    tuned = ExpertParallelMoE(gate, wgu, wd, top_k=2, tuner=tuner)
    used = set()
    x = torch.randn(11, gate.shape[1], generator=torch.Generator().manual_seed(5 + rank))
    ref = moe_swiglu(x, F.linear(x, gate), wgu, wd, 2)
    tuned_worst = 0.0
    for _ in range(12):
        y = tuned(x)
        used.add((tuned.last_settings.overlap, tuned.last_settings.capacity_factor))
        tuned_worst = max(tuned_worst, float((y - ref).abs().max()))
    return {"worst": worst, "tuned_worst": tuned_worst, "settings_used": len(used)}


def _model_checks(rank: int, world: int) -> dict[str, object]:
    """demo-moe decode with EP shards (fp16) vs the single-worker model on the same prompts."""
    from moe_helpers import PROMPTS, runner

    from batonserve.workers.expert_store.decode import greedy_decode

    prompts = PROMPTS[rank::world]
    ref = greedy_decode(runner(), prompts, 6, keep_logits=True)
    out = {}
    for overlap, cf in ((0, 0.0), (1, 0.5), (2, 0.5)):
        r = runner()
        attach_expert_parallel(r.model, settings=EPSettings(max(overlap, 1), cf))
        res = greedy_decode(r, prompts, 6, keep_logits=True)
        out[f"diff_{overlap}"] = max(
            float((a - b).abs().max() / b.abs().max())
            for a, b in zip(ref.logits, res.logits, strict=True)
        )
        out[f"tokens_{overlap}"] = res.tokens == ref.tokens
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    try:
        result = {**_block_checks(rank, world), **_model_checks(rank, world)}
    finally:
        if world > 1:
            dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def ep2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """Findings of both ranks of a 2-process gloo group."""
    out = tmp_path_factory.mktemp("ep2")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_ep2_block_matches_single_process(ep2: list[dict[str, object]]) -> None:
    """fp32: equal up to GEMM rounding (rows of two ranks meet in one matmul) for every
    overlap degree, capacity factor, uneven split and empty rank."""
    for res in ep2:
        assert float(res["worst"]) < 1e-5  # type: ignore[arg-type]


def test_ep2_tuner_switch_keeps_outputs(ep2: list[dict[str, object]]) -> None:
    """The tuner tried several settings and outputs stayed equal."""
    for res in ep2:
        assert int(res["settings_used"]) >= 3  # type: ignore[call-overload]
        assert float(res["tuned_worst"]) < 1e-5  # type: ignore[arg-type]


def test_ep2_model_decode_identical(ep2: list[dict[str, object]]) -> None:
    """demo-moe with experts split over 2 ranks decodes the same tokens as the single worker.

    Logits agree to fp16 rounding: an expert's matmul now holds both ranks' rows (another M), and
    capacity rounds split rows, which changes the GEMM blocking.
    """
    for res in ep2:
        assert res["tokens_0"] and res["tokens_1"] and res["tokens_2"]
        assert float(res["diff_0"]) < 2e-3  # type: ignore[arg-type]
        assert float(res["diff_1"]) < 2e-3 and float(res["diff_2"]) < 2e-3  # type: ignore[arg-type]


def test_ep1_without_group(tmp_path: Path) -> None:
    """Expert-parallel size 1 (no process group) gives the same results."""
    _worker(0, 1, 0, str(tmp_path))
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["worst"] < 1e-5 and res["tokens_1"] and res["tokens_2"]
    assert res["diff_0"] == 0.0  # one rank, one round: the very same matmuls, bitwise equal
    assert res["diff_1"] < 2e-3 and res["diff_2"] < 2e-3

"""Decode graphs (workers/decode_graph.py): padded bucket runs give the eager engine's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testkit.hf_tiny import make_tiny_model

from batonserve.workers.decode_graph import bucket_sizes
from batonserve.workers.engine import Engine
from batonserve.workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mistral (sliding window on: the op's window argument is exercised)."""
    return make_tiny_model("mistral", tmp_path_factory.mktemp("graphs"), num_hidden_layers=2)


def _generate(
    model_dir: Path, mode: str, prompts: list[list[int]], buckets: tuple[int, ...] = ()
) -> list[list[int]]:
    engine = Engine.from_model(
        model_dir,
        dtype="float32",
        device="cpu",
        max_num_seqs=6,
        compile_decode=mode,
        compile_decode_buckets=buckets,
        num_kv_blocks=64,
        block_size=4,
    )
    if mode:
        graphs = engine.runner.decode_graphs  # type: ignore[attr-defined]
        assert graphs is not None
        assert sorted(graphs.runners) == list(buckets or (1, 2, 4, 6))
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (9, 3, 14, 6, 1)
    ]
    return [o.token_ids for o in engine.generate(prompts, params)]


def test_bucket_sizes() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]


# inductor compiles each bucket (up to a minute on a loaded 2-core VM): two buckets only there.
@pytest.mark.parametrize(("mode", "buckets"), [("eager", ()), ("inductor", (2, 6))])
def test_padded_graphs_match_eager_greedy_tokens(
    model_dir: Path, mode: str, buckets: tuple[int, ...]
) -> None:
    """Five requests finishing at different steps run through padded buckets (padded rows write
    the scratch block only): the same greedy tokens as the eager engine, in float32."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 2)]
    assert _generate(model_dir, mode, prompts, buckets) == _generate(model_dir, "", prompts)


def test_unknown_mode_is_an_error(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="compile_decode"):
        Engine.from_model(model_dir, dtype="float32", device="cpu", compile_decode="bogus")


@pytest.mark.parametrize("window", [0, 6])
def test_decode_op_reference_path_matches_cpu_kernel(window: int) -> None:
    """The op's device-generic branch (the plan sized by the table width, as CUDA graphs need)
    gives the C kernel's output, and both write the new K/V at the slots."""
    from batonserve.kernels import decode_op  # noqa: F401
    from batonserve.kernels.cpu import paged_attention as cpa

    g = torch.Generator().manual_seed(0)
    bs, hkv, h, d, lens = 4, 2, 4, 16, [3, 9, 1]
    tables = torch.tensor([[1, 0, 0, 0], [2, 3, 4, 0], [5, 0, 0, 0]], dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    pos = ctx.long() - 1
    slots = tables[torch.arange(3), pos // bs].long() * bs + pos % bs
    q, k, v = (torch.randn(3, n, d, generator=g) for n in (h, hkv, hkv))
    outs = []
    for enabled in (True, False):
        kc, vc = (
            torch.randn(6, bs, hkv, d, generator=torch.Generator().manual_seed(1)) for _ in "kv"
        )
        cpa.set_cpu_kernels_enabled(enabled)
        try:
            out = torch.ops.batonserve.decode_attention_kv(
                q, k, v, kc, vc, slots, tables, ctx, window, bs
            )
        finally:
            cpa.set_cpu_kernels_enabled(True)
        assert torch.equal(kc.view(-1, hkv, d)[slots], k)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)

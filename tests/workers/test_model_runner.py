"""ModelRunner: KV cache sizing, the per-layer hook, and KV handoff through read_kv/write_kv."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from testkit.hf_tiny import make_tiny_model
from testkit.paged_batch import PagedSeqs

from batonserve.workers.config import EngineConfig
from batonserve.workers.model_runner import ModelRunner

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (3 layers) shared by this module's tests."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("runner"), num_hidden_layers=3)


def test_cache_sizing_device_and_shapes(model_dir: Path) -> None:
    runner = ModelRunner(model_dir, EngineConfig(dtype="float32", num_kv_blocks=7, block_size=8))
    mc = runner.model_config
    assert runner.num_blocks == 7 and runner.block_size == 8
    assert runner.device == torch.device("cpu") and runner.dtype == torch.float32
    assert runner.kv_cache.shape == (3, 2, 7, 8, mc.num_kv_heads, mc.head_dim)
    per_block = 2 * 3 * 16 * mc.num_kv_heads * mc.head_dim * 4
    sized = ModelRunner(
        model_dir, EngineConfig(dtype="float32", kv_cache_bytes=per_block * 5 + 1, block_size=16)
    )
    assert sized.num_blocks == 5
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        ModelRunner(
            model_dir, EngineConfig(dtype="float32", kv_cache_bytes=per_block - 1, block_size=16)
        )
    assert runner.tokenizer_path.is_file()


def test_layer_hook_runs_after_each_layers_kv_is_written(model_dir: Path) -> None:
    runner = ModelRunner(model_dir, EngineConfig(num_kv_blocks=8, block_size=4))
    seqs = PagedSeqs(block_size=4, num_blocks=8)
    batch = seqs.step({seqs.add(): [5, 6, 7, 8, 9]})
    kv = runner.kv_cache.view(3, 2, 32, -1)  # [layers, 2, slots, Hkv * d]
    seen: list[tuple[int, bool, bool]] = []

    def hook(layer: int) -> None:
        written = bool((kv[layer, :, batch.slot_mapping] != 0).all())
        later_empty = layer == 2 or bool((kv[layer + 1, :, batch.slot_mapping] == 0).all())
        seen.append((layer, written, later_empty))

    runner.execute(batch, layer_hook=hook)
    assert seen == [(0, True, True), (1, True, True), (2, True, True)]


def test_kv_handoff_with_read_kv_write_kv(model_dir: Path) -> None:
    """Prefill on runner A, move its KV to other blocks of runner B: B's decode equals A's."""
    a = ModelRunner(model_dir, EngineConfig(num_kv_blocks=16, block_size=4))
    b = ModelRunner(model_dir, EngineConfig(num_kv_blocks=16, block_size=4))
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    seqs_a = PagedSeqs(block_size=4, num_blocks=16, seed=1)
    seqs_b = PagedSeqs(block_size=4, num_blocks=16, seed=2)
    sa, sb = seqs_a.add(), seqs_b.add()
    first = a.execute(seqs_a.step({sa: prompt}))
    # Reserve B's blocks for the prompt without computing it, then copy every layer's KV across.
    seqs_b.tokens[sb] = list(prompt)
    seqs_b.tables[sb] = [seqs_b.free.pop() for _ in range(3)]
    src = torch.tensor([seqs_a.slot(sa, p) for p in range(len(prompt))])
    dst = torch.tensor([seqs_b.slot(sb, p) for p in range(len(prompt))])
    assert not torch.equal(src, dst)
    for layer in range(3):
        k, v = a.read_kv(layer, src)
        assert k.shape == (len(prompt), a.model_config.num_kv_heads, a.model_config.head_dim)
        b.write_kv(layer, dst, k, v)
    tok = int(first.argmax())
    out_a = a.execute(seqs_a.step({sa: [tok]}))
    out_b = b.execute(seqs_b.step({sb: [tok]}))
    assert torch.equal(out_a, out_b)


def test_two_runners_in_two_threads_match_sequential(model_dir: Path) -> None:
    """The forward context is per thread: concurrent forwards of two runners do not mix."""
    import threading

    runners = [
        ModelRunner(model_dir, EngineConfig(num_kv_blocks=16, block_size=4)) for _ in range(2)
    ]
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]

    def run(i: int, out: dict[int, torch.Tensor]) -> None:
        seqs = PagedSeqs(block_size=4, num_blocks=16, seed=i)
        s = seqs.add()
        logits = [runners[i].execute(seqs.step({s: prompts[i]}))]
        for tok in (11, 12, 13, 14, 15):
            logits.append(runners[i].execute(seqs.step({s: [tok]})))
        out[i] = torch.cat(logits)

    sequential: dict[int, torch.Tensor] = {}
    for i in range(2):
        runners[i].kv_cache.zero_()
        run(i, sequential)
    concurrent: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=run, args=(i, concurrent)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert torch.equal(concurrent[0], sequential[0]) and torch.equal(concurrent[1], sequential[1])


def test_auto_dtype_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: bf16 on a CPU with native bf16 matmul, fp32 on other CPUs, the checkpoint's on GPU."""
    from batonserve.workers import model_runner as mr

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(mr, "cpu_has_native_bf16", lambda: True)
    assert mr.resolve_dtype("auto", "float16", cpu) == torch.bfloat16
    assert mr.resolve_dtype("float32", "float16", cpu) == torch.float32  # an explicit dtype wins
    monkeypatch.setattr(mr, "cpu_has_native_bf16", lambda: False)
    assert mr.resolve_dtype("auto", "bfloat16", cpu) == torch.float32
    assert mr.resolve_dtype("auto", "float16", gpu) == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        mr.resolve_dtype("auto", "int8", gpu)


def test_prepacked_weights_give_the_same_logits(model_dir: Path) -> None:
    """The oneDNN-packed linear weights (CPU) match F.linear on the plain weights."""
    runner = ModelRunner(model_dir, EngineConfig(dtype="float32", num_kv_blocks=8, block_size=4))
    assert runner.model.lm_head_packed is not None  # oneDNN is in every CPU torch wheel

    def prefill() -> torch.Tensor:
        seqs = PagedSeqs(block_size=4, num_blocks=8)
        return runner.execute(seqs.step({seqs.add(): [5, 6, 7, 8, 9]}, all_logits=True))

    packed = prefill()
    for m in runner.model.modules():
        for name in ("qkv_packed", "o_packed", "gate_up_packed", "down_packed", "lm_head_packed"):
            if hasattr(m, name):
                setattr(m, name, None)
    plain = prefill()
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)


def test_num_threads_knob(model_dir: Path) -> None:
    before = torch.get_num_threads()
    try:
        ModelRunner(model_dir, EngineConfig(num_threads=1, num_kv_blocks=4, block_size=4))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="num_threads"):
        EngineConfig(num_threads=-1)


def _has_panels(runner: ModelRunner) -> bool:
    packed = runner.model.lm_head_packed
    return packed is not None and packed.panels is not None


def test_cpu_gemm_panels_match_onednn(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """bf16 weights in either kind of panel: the same logits as oneDNN's within bf16 rounding, at
    a prefill big enough (4+ rows) to take them; "auto" follows the CPU rule and says so."""
    from batonserve.kernels.cpu import panel_gemm
    from batonserve.workers import model_runner as mr

    if not panel_gemm.available():
        pytest.skip("needs a C compiler and AVX-512 (the panel kernel's build)")

    def build(mode: str) -> ModelRunner:
        cfg = EngineConfig(dtype="bfloat16", cpu_gemm=mode, num_kv_blocks=8, block_size=4)
        return ModelRunner(model_dir, cfg)

    def prefill(runner: ModelRunner) -> torch.Tensor:
        seqs = PagedSeqs(block_size=4, num_blocks=8)
        ids = list(range(3, 23))  # 20 rows
        return runner.execute(seqs.step({seqs.add(): ids}, all_logits=True))

    onednn = build("onednn")
    assert not _has_panels(onednn)
    layouts = ["fp32_panels"] + (["dot_panels"] if panel_gemm.available(dot=True) else [])
    for layout in layouts:
        runner = build(layout)
        assert _has_panels(runner)
        torch.testing.assert_close(prefill(runner), prefill(onednn), atol=0.05, rtol=0.05)
    monkeypatch.setattr(mr, "default_cpu_gemm", lambda: "onednn")
    assert not _has_panels(build("auto"))
    assert "cpu_gemm" not in capsys.readouterr().err
    monkeypatch.setattr(mr, "default_cpu_gemm", lambda: "fp32_panels")
    assert _has_panels(build("auto"))
    assert "cpu_gemm: fp32_panels" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cpu_gemm"):
        EngineConfig(cpu_gemm="on")


@pytest.mark.parametrize(
    ("cpuinfo", "amx", "layout"),
    [
        ("GenuineIntel avx512_bf16 amx_tile amx_bf16", False, "onednn"),
        ("GenuineIntel avx512_bf16", True, "onednn"),
        ("GenuineIntel avx512_bf16", False, "fp32_panels"),
        ("AuthenticAMD avx512_bf16", False, "dot_panels"),
        ("AuthenticAMD avx2", False, "onednn"),
        ("", False, "onednn"),
    ],
)
def test_default_cpu_gemm_by_cpu_flags(
    monkeypatch: pytest.MonkeyPatch, cpuinfo: str, amx: bool, layout: str
) -> None:
    from batonserve.workers import model_runner as mr

    monkeypatch.setattr(mr, "_cpuinfo", lambda: cpuinfo)
    monkeypatch.setattr(mr, "_torch_has_amx", lambda: amx)
    assert mr.default_cpu_gemm() == layout


def test_a_config_with_the_old_gemm_key_is_told_its_new_name() -> None:
    from batonserve.cluster.schema import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"cpu_fp32_gemm is now cpu_gemm \(on: fp32_panels"):
        from_dict(EngineConfig, {"cpu_fp32_gemm": "on"}, "engine")
    assert from_dict(EngineConfig, {"cpu_gemm": "dot_panels"}).cpu_gemm == "dot_panels"

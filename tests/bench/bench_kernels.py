"""Triton kernels vs the torch references (and SDPA); decode attention and a decode step vs HBM roofline.

    python3 tests/bench/bench_kernels.py                 # CUDA: timings; CPU: interpreter smoke
    python3 tests/bench/bench_kernels.py --hbm-gbps 3350 # also compare with a spec bandwidth
    python3 tests/bench/bench_kernels.py --smoke-timing  # CPU: run the timing code on tiny shapes

On a CUDA GPU every kernel is timed (CUDA events, median of repeats) against its torch reference in
one run; attention also against torch.nn.functional.scaled_dot_product_attention on the same data
laid out dense. Decode attention and a whole-model decode step (random-weight Llama, bf16) are
compared with the HBM roofline: bytes that must be read / bandwidth, the bandwidth measured in the
same run by a large device-to-device copy. Without CUDA the script runs every Triton kernel under
TRITON_INTERPRET=1 on small shapes, prints its error against the reference, and says that timings
need a GPU (`--smoke-timing` runs the timing tables on tiny CPU shapes: code check, not figures).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel module is imported

import torch.nn.functional as F  # noqa: E402

from batonserve.kernels import attention as ref_attn  # noqa: E402
from batonserve.kernels import moe as ref_moe  # noqa: E402
from batonserve.kernels import norm as ref_norm  # noqa: E402
from batonserve.kernels.triton.decode_attention import decode_attention_triton  # noqa: E402
from batonserve.kernels.triton.grouped_swiglu import grouped_swiglu_triton  # noqa: E402
from batonserve.kernels.triton.merge import merge_attention_states_many_triton  # noqa: E402
from batonserve.kernels.triton.prefill_attention import prefill_attention_triton  # noqa: E402
from batonserve.kernels.triton.rms_norm import fused_add_rms_norm_triton  # noqa: E402
from batonserve.kernels.triton.topk_routing import topk_routing_triton  # noqa: E402


def timeit(fn: Callable[[], object], dev: torch.device, reps: int) -> float:
    """Median seconds of fn() over reps calls (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), dev, 10)


def paged(batch: int, ctx: int, hkv: int, d: int, bs: int, dtype: torch.dtype, dev: torch.device):  # type: ignore[no-untyped-def]
    """Random paged caches holding `batch` contexts of `ctx` keys, and the matching dense K/V."""
    nb = -(-ctx // bs)
    k = torch.randn(batch * nb, bs, hkv, d, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    tables = torch.randperm(batch * nb, device=dev).view(batch, nb).int()
    dense_k = k[tables.long()].reshape(batch, nb * bs, hkv, d)[:, :ctx].transpose(1, 2)
    dense_v = v[tables.long()].reshape(batch, nb * bs, hkv, d)[:, :ctx].transpose(1, 2)
    return k, v, tables, dense_k.contiguous(), dense_v.contiguous()


def row(name: str, t_triton: float, others: dict[str, float], extra: str = "") -> None:
    """One table line: Triton time and each other time as a ratio to it."""
    cmp = "  ".join(f"{k} {v * 1e6:9.1f} us ({v / t_triton:5.2f}x)" for k, v in others.items())
    print(f"{name:<44} triton {t_triton * 1e6:9.1f} us  {cmp} {extra}")


def bench_decode(dev: torch.device, shapes: list[tuple[int, int]], reps: int, bw: float) -> None:
    """Paged split-K decode: Triton vs reference vs SDPA on dense K/V; vs the KV-read roofline."""
    h, hkv, d, bs, dt = 32, 8, 128, 16, torch.bfloat16
    if dev.type == "cpu":
        h, hkv, d, bs, dt = 4, 2, 16, 4, torch.float32
    print(f"\n# decode attention  H={h} Hkv={hkv} d={d} block={bs} {dt}")
    for batch, ctx in shapes:
        k, v, tables, dk, dv = paged(batch, ctx, hkv, d, bs, dt, dev)
        q = torch.randn(batch, h, d, dtype=dt, device=dev)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        plan = ref_attn.plan_decode(tables, lens, bs)
        t_tr = timeit(partial(decode_attention_triton, q, k, v, plan), dev, reps)
        t_ref = timeit(partial(ref_attn.decode_attention, q, k, v, plan), dev, reps)
        q4 = q[:, :, None]  # [B, H, 1, d]
        t_sdpa = timeit(
            partial(F.scaled_dot_product_attention, q4, dk, dv, enable_gqa=True), dev, reps
        )
        kv_bytes = 2 * batch * ctx * hkv * d * dk.element_size()
        roof = kv_bytes / bw
        extra = f"roofline {roof * 1e6:.1f} us -> triton at {roof / t_tr:.0%} of copy bandwidth"
        row(f"B={batch} ctx={ctx}", t_tr, {"torch-ref": t_ref, "sdpa": t_sdpa}, extra)


def bench_prefill(dev: torch.device, shapes: list[tuple[int, int, int]], reps: int) -> None:
    """Paged prefill with a cached prefix: Triton vs reference vs SDPA (padded, bottom-right mask)."""
    h, hkv, d, bs, dt = 32, 8, 128, 16, torch.bfloat16
    if dev.type == "cpu":
        h, hkv, d, bs, dt = 4, 2, 16, 4, torch.float32
    print(f"\n# prefill attention (cached prefix)  H={h} Hkv={hkv} d={d} {dt}")
    for batch, new, prefix in shapes:
        ctx = new + prefix
        k, v, tables, dk, dv = paged(batch, ctx, hkv, d, bs, dt, dev)
        q = torch.randn(batch * new, h, d, dtype=dt, device=dev)
        cu = torch.arange(0, batch + 1, device=dev, dtype=torch.int32) * new
        lens = torch.full((batch,), ctx, device=dev)
        plan = ref_attn.plan_prefill(cu, lens, block_tables=tables, block_size=bs)
        t_tr = timeit(partial(prefill_attention_triton, q, k, v, plan), dev, reps)
        t_ref = timeit(partial(ref_attn.prefill_attention, q, k, v, plan), dev, reps)
        q4 = q.view(batch, new, h, d).transpose(1, 2)
        mask = torch.ones(new, ctx, dtype=torch.bool, device=dev).tril(prefix)
        t_sdpa = timeit(
            partial(F.scaled_dot_product_attention, q4, dk, dv, attn_mask=mask, enable_gqa=True),
            dev,
            reps,
        )
        row(f"B={batch} new={new} prefix={prefix}", t_tr, {"torch-ref": t_ref, "sdpa": t_sdpa})


def bench_small_ops(dev: torch.device, tokens: int, reps: int) -> None:
    """LSE merge, fused add+RMSNorm, top-k routing, grouped SwiGLU: Triton vs reference."""
    big = dev.type == "cuda"
    dt = torch.bfloat16 if big else torch.float32
    hid, heads, d = (4096, 32, 128) if big else (64, 4, 16)
    experts, inter, top_k = (8, 14336, 2) if big else (4, 32, 2)
    print(f"\n# small ops  tokens={tokens} hidden={hid} {dt}")
    outs = torch.randn(4, tokens, heads, d, dtype=dt, device=dev)
    lses = torch.randn(4, tokens, heads, device=dev)
    t_tr = timeit(lambda: merge_attention_states_many_triton(outs, lses), dev, reps)
    t_ref = timeit(lambda: ref_attn.merge_attention_states_many(outs, lses), dev, reps)
    row("LSE merge (4 partials)", t_tr, {"torch-ref": t_ref})
    x = torch.randn(tokens, hid, dtype=dt, device=dev)
    res, w = torch.randn_like(x), torch.ones(hid, dtype=dt, device=dev)
    t_tr = timeit(lambda: fused_add_rms_norm_triton(x, res, w, 1e-6), dev, reps)
    t_ref = timeit(lambda: ref_norm.fused_add_rms_norm(x, res, w, 1e-6), dev, reps)
    row("fused add + RMSNorm", t_tr, {"torch-ref": t_ref})
    logits = torch.randn(tokens, experts, dtype=dt, device=dev)
    t_tr = timeit(lambda: topk_routing_triton(logits, top_k), dev, reps)
    t_ref = timeit(lambda: ref_moe.topk_routing(logits, top_k), dev, reps)
    row(f"top-{top_k} routing over {experts} experts", t_tr, {"torch-ref": t_ref})
    _, ids = ref_moe.topk_routing(logits, top_k)
    xp, perm = ref_moe.permute_by_expert(x, ids, experts)
    w_gu = torch.randn(experts, 2 * inter, hid, dtype=dt, device=dev) / hid**0.5
    w_dn = torch.randn(experts, hid, inter, dtype=dt, device=dev) / inter**0.5
    t_tr = timeit(lambda: grouped_swiglu_triton(xp, perm.counts, w_gu, w_dn), dev, reps)
    t_ref = timeit(lambda: ref_moe.grouped_swiglu(xp, perm.counts, w_gu, w_dn), dev, reps)
    row(f"grouped SwiGLU ({experts} experts, I={inter})", t_tr, {"torch-ref": t_ref})


def bench_decode_step(dev: torch.device, batch: int, ctx: int, reps: int, bw: float) -> None:
    """A whole-model decode step (random Llama, engine model runner) vs weights + KV bytes / bw."""
    import tempfile

    import transformers as tf

    from batonserve.kernels import dispatch
    from batonserve.workers.config import EngineConfig
    from batonserve.workers.forward_batch import ForwardBatch
    from batonserve.workers.model_runner import ModelRunner

    big = dev.type == "cuda"
    cfg = tf.LlamaConfig(
        vocab_size=32000 if big else 512,
        hidden_size=2048 if big else 64,
        intermediate_size=5632 if big else 128,
        num_hidden_layers=16 if big else 2,
        num_attention_heads=32 if big else 4,
        num_key_value_heads=8 if big else 2,
        max_position_embeddings=max(4096, ctx + 1),
        tie_word_embeddings=False,
    )
    bs = 16
    nb = -(-(ctx + 1) // bs)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16 if big else torch.float32)
        model.save_pretrained(tmp)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        weight_bytes -= model.model.embed_tokens.weight.numel() * model.dtype.itemsize  # gathered
        del model
        engine = EngineConfig(num_kv_blocks=batch * nb, block_size=bs, device=dev.type)
        runner = ModelRunner(Path(tmp), engine)
    tables = torch.arange(batch * nb, dtype=torch.int32).view(batch, nb)
    pos = torch.full((batch,), ctx, dtype=torch.int64)
    fb = ForwardBatch(
        input_ids=torch.randint(0, cfg.vocab_size, (batch,)),
        positions=pos,
        cu_query_lens=torch.arange(batch + 1, dtype=torch.int32),
        context_lens=torch.full((batch,), ctx + 1, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=tables[:, ctx // bs].long() * bs + ctx % bs,
        logits_indices=torch.arange(batch),
        max_query_len=1,
        max_context_len=ctx + 1,
    )
    mc = runner.model_config
    kv_bytes = 2 * mc.num_layers * batch * (ctx + 1) * mc.num_kv_heads * mc.head_dim
    kv_bytes *= runner.kv_cache.element_size()
    roof = (weight_bytes + kv_bytes) / bw
    print(f"\n# decode step  Llama {weight_bytes / 1e9:.2f} GB weights, B={batch} ctx={ctx}")
    dispatch.set_triton_enabled(True, any_device=not big)  # CPU smoke: interpreter kernels
    t_tr = timeit(lambda: runner.execute(fb), dev, reps)
    dispatch.set_triton_enabled(False)
    try:
        t_ref = timeit(lambda: runner.execute(fb), dev, reps)
    finally:
        dispatch.set_triton_enabled(True)
    extra = f"roofline {roof * 1e3:.3f} ms -> {t_tr / roof:.2f}x roofline"
    row("decode step (whole model)", t_tr, {"all-torch-ref": t_ref}, extra)


def smoke() -> int:
    """CPU: run the test suite's interpreter checks (tests/kernels/triton) and report."""
    import pytest

    print("no CUDA GPU: running the Triton kernels under TRITON_INTERPRET=1 against the references")
    tests = Path(__file__).resolve().parents[1] / "kernels" / "triton"
    rc = int(pytest.main(["-q", "-p", "no:cacheprovider", str(tests)]))
    print("timings need a CUDA GPU: this machine only checks correctness (interpreter).")
    return rc


def main() -> int:
    """Parse flags, run the tables (GPU) or the interpreter smoke (CPU)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--hbm-gbps", type=float, default=0.0, help="spec HBM bandwidth, GB/s")
    ap.add_argument("--smoke-timing", action="store_true", help="CPU: timing code on tiny shapes")
    args = ap.parse_args()
    if not HAS_CUDA and not args.smoke_timing:
        return smoke()
    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    torch.manual_seed(0)
    if HAS_CUDA:
        print(f"device: {torch.cuda.get_device_name(dev)}  torch {torch.__version__}")
        decode_shapes = [(1, 4096), (1, 32768), (1, 131072), (8, 8192), (64, 2048), (256, 1024)]
        prefill_shapes = [(1, 2048, 0), (1, 512, 8192), (4, 1024, 1024), (16, 128, 4096)]
        tokens, step, reps = 4096, (32, 2048), args.reps
    else:
        print("CPU --smoke-timing: interpreter times, NOT kernel performance")
        decode_shapes, prefill_shapes = [(1, 40), (2, 17)], [(2, 5, 7)]
        tokens, step, reps = 8, (2, 20), 2
    bw = copy_bandwidth(dev, (1 << 30) if HAS_CUDA else (1 << 24))
    print(f"measured copy bandwidth: {bw / 1e9:.0f} GB/s (roofline below uses it)")
    if args.hbm_gbps:
        print(
            f"spec bandwidth {args.hbm_gbps:.0f} GB/s: copy reaches {bw / 1e9 / args.hbm_gbps:.0%}"
        )
    bench_decode(dev, decode_shapes, reps, bw)
    bench_prefill(dev, prefill_shapes, reps)
    bench_small_ops(dev, tokens, reps)
    bench_decode_step(dev, *step, reps=reps, bw=bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every Triton kernel for a CUDA architecture without a GPU (Triton's ahead-of-time path).

    python -m batonserve.kernels.triton.compile_check                      # sm_80 and sm_90, all dtypes
    python -m batonserve.kernels.triton.compile_check --target 90:bfloat16 # one (arch, dtype)

The interpreter (TRITON_INTERPRET=1) checks the kernels' numbers on CPU, but it never runs the
compiler: this catches what only the GPU build would reject (tl.dot shapes, types across branches
and loops, constexpr paths the interpreter skips). It needs no driver, only the ptxas that ships
in the triton wheel. Must run without TRITON_INTERPRET (jit then builds compilable kernels).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from batonserve.kernels.triton import (
    decode_attention,
    grouped_swiglu,
    merge,
    prefill_attention,
    rms_norm,
    topk_routing,
)

_TY = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Max dynamic shared memory per block (bytes): A100 (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}


@dataclass(frozen=True)
class Compiled:
    """One kernel built for one target: its name, dtype, arch and cubin size."""

    kernel: str
    dtype: str
    arch: int
    cubin_bytes: int
    shared_bytes: int
    seconds: float


def _specs(dt: str) -> list[tuple[object, dict[str, str], dict[str, object]]]:
    """(kernel, runtime signature, constexprs) for every kernel with activations of type dt."""
    t = _TY[dt]
    prec = "ieee" if dt == "float32" else "tf32"
    i32, i64, f32 = "i32", "*i64", "fp32"
    attn_flags = {"UPCAST": False, "PREC": prec, "RNE": False}
    decode = {
        **dict.fromkeys(["q_ptr", "k_ptr", "v_ptr"], f"*{t}"),
        "bt_ptr": i64,
        "lens_ptr": i64,
        "part_out_ptr": "*fp32",
        "part_lse_ptr": "*fp32",
        "scale": f32,
        **dict.fromkeys(["window", "split_len", "max_blocks", "block_size", "G", "D", "S"], i32),
        **dict.fromkeys(["stride_qb", "stride_qh", "stride_kb", "stride_ko", "stride_kh"], i32),
        **dict.fromkeys(["stride_vb", "stride_vo", "stride_vh"], i32),
    }
    prefill = {
        **dict.fromkeys(["q_ptr", "k_ptr", "v_ptr"], f"*{t}"),
        **dict.fromkeys(["q_index_ptr", "k_index_ptr", "q_lens_ptr", "k_lens_ptr"], i64),
        "out_start_ptr": i64,
        "out_ptr": f"*{t}",
        "lse_ptr": "*fp32",
        "scale": f32,
        **dict.fromkeys(["window", "G", "D", "H", "max_q", "max_k"], i32),
        **dict.fromkeys(["stride_qt", "stride_qh", "stride_kt", "stride_kh"], i32),
        **dict.fromkeys(["stride_vt", "stride_vh"], i32),
    }
    merge_sig = {
        "outs_ptr": "*fp32",
        "lses_ptr": "*fp32",
        "out_ptr": f"*{t}",
        "lse_ptr": "*fp32",
        **dict.fromkeys(["S", "D", "stride_os", "stride_on", "stride_ls", "stride_ln"], i32),
    }
    norm = {
        **dict.fromkeys(["x_ptr", "res_ptr", "w_ptr", "out_ptr", "sum_ptr"], f"*{t}"),
        "D": i32,
        "eps": f32,
        "stride_x": i32,
        "stride_r": i32,
    }
    topk = {"logits_ptr": f"*{t}", "w_ptr": "*fp32", "ids_ptr": i64, "E": i32, "stride_t": i32}
    ffn = {
        **dict.fromkeys(["a_ptr", "w_ptr", "out_ptr"], f"*{t}"),
        **dict.fromkeys(["tile_end_ptr", "row_start_ptr", "counts_ptr"], i64),
        **dict.fromkeys(["E", "K", "NOUT", "stride_we", "stride_wn"], i32),
    }
    cap = 32 if dt == "float32" else 64  # the wrappers' tile caps
    tiles = {"BLOCK_E": 8, "BLOCK_M": cap, "BLOCK_N": cap, "BLOCK_K": cap, **attn_flags}
    return [
        (
            decode_attention._decode_split_kernel,
            decode,
            {"BLOCK_G": 16, "BLOCK_N": 64, "BLOCK_D": 128, **attn_flags},
        ),
        (
            prefill_attention._prefill_kernel,
            prefill,
            {"CAUSAL": True, "HAS_WINDOW": True, "WRITE_LSE": True, "BLOCK_M": cap, "BLOCK_N": cap}
            | {"BLOCK_D": 128, **attn_flags},
        ),
        (merge._merge_kernel, merge_sig, {"BLOCK_S": 8, "BLOCK_D": 128, "RNE": False}),
        (
            rms_norm._rms_norm_kernel,
            norm,
            {"HAS_RES": True, "ROUND_NORMED": dt != "float32", "BLOCK_D": 4096, "RNE": False},
        ),
        (topk_routing._topk_kernel, topk, {"TOP_K": 2, "RENORM": True, "BLOCK_E": 8, "BLOCK_K": 2}),
        (grouped_swiglu._grouped_matmul_kernel, ffn, {"SWIGLU": True, **tiles}),  # gate/up
        (grouped_swiglu._grouped_matmul_kernel, dict(ffn), {"SWIGLU": False, **tiles}),  # down
    ]


def compile_all(targets: list[tuple[int, str]]) -> list[Compiled]:
    """Build every kernel for each (arch, dtype); raises the compiler's error on the first failure."""
    if triton.knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile for a GPU target")
    done: list[Compiled] = []
    for arch, dt in targets:
        if dt not in _TY:
            raise ValueError(f"--target: dtype must be one of {sorted(_TY)}, got {dt!r}")
        for fn, sig, consts in _specs(dt):
            for name in consts:
                sig[name] = "constexpr"
            t0 = time.perf_counter()
            src = ASTSource(fn=fn, signature=sig, constexprs=consts)  # type: ignore[arg-type]
            out = triton.compile(src, target=GPUTarget("cuda", arch, 32))
            name = getattr(fn, "__name__", str(fn))
            took = time.perf_counter() - t0
            shared = int(out.metadata.shared)
            if shared > SHARED_LIMIT.get(arch, 101_376):
                raise RuntimeError(f"{name} {dt} sm_{arch}: {shared} B shared memory > limit")
            done.append(Compiled(name, dt, arch, len(out.asm["cubin"]), shared, took))
    return done


def main() -> int:
    """CLI: compile for the given archs/dtypes and print one line per kernel."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--target", action="append", help="ARCH:DTYPE, e.g. 90:bfloat16 (default: 80, 90 x all)"
    )
    args = ap.parse_args()
    targets = [(a, d) for a in (80, 90) for d in sorted(_TY)]
    if args.target:
        targets = [(int(t.split(":")[0]), t.split(":")[1]) for t in args.target]
    for c in compile_all(targets):
        print(
            f"sm_{c.arch} {c.dtype:<9} {c.kernel:<22} cubin {c.cubin_bytes:>7} B  "
            f"shared {c.shared_bytes:>6} B  {c.seconds:.1f}s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

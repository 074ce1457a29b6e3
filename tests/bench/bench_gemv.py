"""bf16 linears of 1-3 rows: the C kernel (kernels/cpu/gemv.py) against oneDNN's packed linear.

    python3 tests/bench/bench_gemv.py [--rows 1,2,3] [--threads 1,2] [--rounds 5]

The weights of the engine bench's model (tests/bench/bench_engine.py: 8 layers of qkv 1024x512,
o 512x512, gate_up 2816x512, down 512x1408, and a 32000x512 lm_head; 76 MiB in bf16), each used
once per pass as in a small-batch decode step, so they stream from memory (or the last-level cache
where it holds them) rather than sit in L1/L2. Prints the median pass time and weight bytes per
second of each, and their ratio, per row count and thread count; rounds alternate the two.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from batonserve.kernels.cpu import gemv

SHAPES = [(1024, 512), (512, 512), (2816, 512), (512, 1408)] * 8 + [(32000, 512)]


def timed(fn: Callable[[], None], reps: int = 10) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1,2,3")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if any(not 1 <= int(r) <= gemv.MAX_ROWS for r in args.rows.split(",")):
        ap.error(f"--rows: the kernel takes 1-{gemv.MAX_ROWS} rows, got {args.rows}")
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for n, k in SHAPES]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    if gemv._library() is None:
        print(
            "gemv kernel not built here (needs a C compiler and AVX-512-BF16): nothing to compare"
        )
        return
    print(f"torch {torch.__version__}; {len(weights)} weights, {nbytes / 2**20:.0f} MiB bf16")

    xs: dict[int, torch.Tensor] = {}  # the input rows of each width, for the current row count

    def onednn() -> None:
        for w, p in zip(weights, packed, strict=True):
            torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")

    def kernel() -> None:
        for w in weights:
            gemv.gemv(xs[w.shape[1]], w, None, fp32_out=False)

    for rows, threads in (
        (int(r), int(t)) for r in args.rows.split(",") for t in args.threads.split(",")
    ):
        xs.update({k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for _, k in SHAPES})
        torch.set_num_threads(threads)
        times: dict[str, list[float]] = {"oneDNN": [], "gemv": []}
        for r in range(args.rounds):
            print(f"  {rows} row(s), {threads} thread(s), round {r + 1}/{args.rounds}", flush=True)
            times["oneDNN"].append(timed(onednn))
            times["gemv"].append(timed(kernel))
        med = {k: statistics.median(v) for k, v in times.items()}
        cells = "  ".join(
            f"{k} {t * 1e3:.2f} ms ({nbytes / t / 1e9:.1f} GB/s)" for k, t in med.items()
        )
        ratios = sorted(a / b for a, b in zip(times["oneDNN"], times["gemv"], strict=True))
        spread = f"{ratios[0]:.2f}-{ratios[-1]:.2f}"
        print(
            f"{rows} row(s), {threads} thread(s): {cells}  gemv speedup {med['oneDNN'] / med['gemv']:.2f}x "
            f"[{spread}]",
            flush=True,
        )


if __name__ == "__main__":
    main()

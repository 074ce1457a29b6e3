"""bf16 GEMMs of 4+ rows: oneDNN's packed linear against both kinds of panels
(kernels/cpu/panel_gemm.py: fp32 FMAs, bf16 dot products), the weights streaming from memory.

    python3 tests/bench/bench_panels.py [--rows 4,8,16,32,64,128,512] [--threads 1,2] [--rounds 3]

The weights of the engine bench's model (tests/bench/bench_gemv.py's SHAPES: 76 MiB in bf16),
each used once per pass as in a decode step, so they come from memory rather than cache. Prints
the median pass time and GFLOP/s of each per row count and thread count; rounds alternate them.
"""

from __future__ import annotations

import argparse
import functools
import statistics

import torch
from bench_gemv import SHAPES, timed

from batonserve.kernels.cpu import panel_gemm


def run_pass(
    packed: list[object], weights: list[torch.Tensor], xs: dict[int, torch.Tensor], dnn: bool
) -> None:
    """Every weight once: oneDNN's packed linear (dnn) or the panel kernel."""
    for w, p in zip(weights, packed, strict=True):
        x = xs[w.shape[1]]
        if dnn:
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
        else:
            panel_gemm.panel_gemm(x, p, w.shape[0], None, fp32_out=False)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="4,8,16,32,64,128,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not panel_gemm.available():
        print("panel kernels not built here (needs a C compiler and AVX-512): nothing to compare")
        return
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen).to(torch.bfloat16) for n, k in SHAPES]
    layouts: dict[str, list[object]] = {
        "oneDNN": [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    }
    layouts["fp32 panels"] = [panel_gemm.to_panels(w) for w in weights]
    if panel_gemm.available(dot=True):
        layouts["dot panels"] = [panel_gemm.to_panels(w, dot=True) for w in weights]
    print(f"torch {torch.__version__}; {len(weights)} weights; {', '.join(layouts)}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for _, k in SHAPES}
            flops = sum(2 * rows * n * k for n, k in SHAPES)

            times: dict[str, list[float]] = {name: [] for name in layouts}
            for r in range(args.rounds):
                print(
                    f"  {rows} rows, {threads} thread(s), round {r + 1}/{args.rounds}", flush=True
                )
                for name in layouts:
                    times[name].append(
                        timed(
                            functools.partial(
                                run_pass, layouts[name], weights, xs, name == "oneDNN"
                            ),
                            reps=5,
                        )
                    )
            cells = "  ".join(
                f"{name} {statistics.median(t) * 1e3:.2f} ms ({flops / statistics.median(t) / 1e9:.0f} GFLOP/s)"
                for name, t in times.items()
            )
            print(f"{rows} rows, {threads} thread(s): {cells}", flush=True)


if __name__ == "__main__":
    main()

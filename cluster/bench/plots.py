"""Plots of bench runs: latency CDFs, and throughput against offered rate for a rate sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from batonserve.cluster.bench.drivers import RequestResult
from batonserve.cluster.bench.report import BenchReport


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def write_plots(
    runs: Sequence[tuple[BenchReport, Sequence[RequestResult]]], out_dir: str | Path
) -> list[Path]:
    """latency_cdf.png always; throughput_vs_rate.png when several offered rates were run."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for rep, results in runs:
        ok = [r for r in results if r.ok]
        samples = (
            [t * 1000 for r in ok if (t := r.ttft_s) is not None],
            [g * 1000 for r in ok for g in r.tbt_s],
            [r.e2e_s * 1000 for r in ok],
        )
        for ax, values in zip(axes, samples, strict=True):
            if values:
                ax.plot(*_cdf(values), label=rep.label)
    for ax, name in zip(axes, ("TTFT", "TBT", "end-to-end latency"), strict=True):
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = out / "latency_cdf.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    rated = sorted(
        (rep for rep, _ in runs if rep.offered_rate is not None),
        key=lambda r: r.offered_rate or 0.0,
    )
    if len(rated) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        rates = [r.offered_rate or 0.0 for r in rated]
        ax.plot(rates, [r.request_rate for r in rated], "o-", label="completed req/s")
        ax.plot(rates, [r.goodput_rate for r in rated], "s--", label="goodput req/s")
        ax.plot(rates, rates, ":", color="grey", label="offered")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("req/s")
        ax2 = ax.twinx()  # tokens/s on its own axis (right)
        ax2.plot(
            rates,
            [r.output_token_rate for r in rated],
            "^-.",
            color="tab:red",
            label="output tok/s",
        )
        ax2.set_ylabel("output tokens/s", color="tab:red")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize="small", loc="upper left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / "throughput_vs_rate.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

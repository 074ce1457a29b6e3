"""Planner plots: throughput against cost, and latency CDFs of the best design per family."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
import numpy as np

from batonserve.cluster.sim.metrics import latencies
from batonserve.cluster.sim.planner import PlanRow


def plot_throughput_vs_cost(rows: Sequence[PlanRow], path: str | Path) -> Path:
    """Scatter of max rate within SLO against $/h, one colour per family."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for fam in sorted({r.design.family for r in rows}):
        pts = [(r.cost_per_hour, r.max_rate) for r in rows if r.design.family == fam]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=fam, s=24)
    ax.set_xlabel("cost ($/hour)")
    ax.set_ylabel("throughput within SLO (requests/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_latency_cdf(rows: Sequence[PlanRow], path: str | Path) -> Path:
    """TTFT and end-to-end latency CDFs of each family's best design at its highest SLO rate."""
    best: dict[str, PlanRow] = {}
    for r in rows:
        if r.result is not None and (
            r.design.family not in best or r.max_rate > best[r.design.family].max_rate
        ):
            best[r.design.family] = r
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "e2e", "end-to-end")):
        for _, r in sorted(best.items()):
            assert r.result is not None
            vals = np.sort(np.asarray(latencies(r.result.records, metric)))
            if vals.size:
                ax.plot(
                    vals,
                    np.arange(1, vals.size + 1) / vals.size,
                    label=f"{r.design.label} @ {r.max_rate:.1f}/s",
                )
        ax.set_xscale("log")
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

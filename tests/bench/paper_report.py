"""Tables and plots of bench_paper.py's results against the Splitwise paper's figures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# The paper's figures (Splitwise §6): (experiment, family, baseline, quantity, value). Its text
# puts Fig. 18a (iso-power: AA 2.15x, HA 1.18x) on the conversation trace; the bars show both
# traces. quantity "throughput": family / baseline; "cost", "power": family / baseline at equal
# rate.
PAPER = (
    ("isopower", "Splitwise-AA", "Baseline-A", "throughput", 2.15),
    # The abstract's "1.4x at 20% lower cost": 70 DGX-A100s cost 0.81 of 40 DGX-H100s.
    ("isopower", "Splitwise-AA", "Baseline-H", "throughput", 1.40),
    ("isopower", "Splitwise-HA", "Baseline-H", "throughput", 1.18),
    ("isocost", "Splitwise-AA", "Baseline-H", "throughput", 1.40),
    ("isothroughput", "Splitwise-AA", "Baseline-H", "cost", 0.75),
    ("isothroughput", "Splitwise-HHcap", "Baseline-H", "power", 0.75),
)
SETTINGS = ("paper", "ours")
FAMS = (
    "Splitwise-AA",
    "Splitwise-HH",
    "Splitwise-HA",
    "Splitwise-HHcap",
    "Baseline-A",
    "Baseline-H",
)


def _load(out: Path, exp: str, setting: str) -> dict | None:
    p = out / f"{exp}_{setting}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _ratio(res: dict | None, fam: str, base: str, quantity: str) -> float | None:
    if res is None or fam not in res["families"] or base not in res["families"]:
        return None
    a, b = res["families"][fam], res["families"][base]
    if quantity == "throughput":
        x, y = a["best"]["rate"], b["best"]["rate"]
    else:
        if a.get(quantity) is None or b.get(quantity) is None:
            return None
        x, y = a[quantity][quantity], b[quantity][quantity]
    return x / y if y else None


def _design_ratio(out: Path, exp: str, fam: str, base: str, tag: str = "") -> float:
    """Throughput ratio between two of the notebook's designs (bench_paper.py designs), or 0.

    `tag`: "" for the first 3000 requests, "_12000s" for 12,000 sampled as SplitwiseSim does.
    """
    p = out / f"{exp}_designs_paper_llama2-70b{tag}.json"
    if not p.exists():
        return 0.0
    d = json.loads(p.read_text())["designs"]
    if fam not in d or base not in d or not d[base]["rate"]:
        return 0.0
    return d[fam]["rate"] / d[base]["rate"]


def _fmt(x: float | None, paper: float | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" + (f" ({x / paper:.2f})" if paper else "")


def tables(out: Path) -> str:
    """Markdown: per experiment, the paper's figure, both settings' (and their ratio to it)."""
    lines = []
    for exp in ("isopower", "isocost", "isothroughput"):
        res = {s: _load(out, exp, s) for s in SETTINGS}
        lines.append(f"\n### {exp}\n")
        lines.append("| figure | paper | paper-faithful (/paper) | batonserve (/paper) |")
        lines.append("| --- | ---: | ---: | ---: |")
        for e, fam, base, q, val in PAPER:
            if e != exp:
                continue
            cells = [_fmt(_ratio(res[s], fam, base, q), val) for s in SETTINGS]
            lines.append(f"| {fam} / {base} {q} | {val:.2f} | {cells[0]} | {cells[1]} |")
        lines.append("")
        lines.append(
            "| family | "
            + " | ".join(f"{s}: best design, req/s or $, power" for s in SETTINGS)
            + " |"
        )
        lines.append("| --- | --- | --- |")
        for fam in FAMS:
            cells = []
            for s in SETTINGS:
                r = res[s]
                if r is None or fam not in r["families"]:
                    cells.append("n/a")
                elif exp == "isothroughput":
                    c, p = r["families"][fam]["cost"], r["families"][fam]["power"]
                    cells.append(
                        f"cost-opt {c['label']} ({c['cost']:.1f}, {c['power']:.0f}); "
                        f"power-opt {p['label']} ({p['cost']:.1f}, {p['power']:.0f})"
                        if c and p
                        else "none passes"
                    )
                else:
                    b = r["families"][fam]["best"]
                    cells.append(f"{b['label']}: {b['rate']:.1f} req/s")
            lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def isocost_conv_plot(out: Path) -> Path | None:
    """Iso-cost on the conversation trace: Splitwise-AA's rate against its split of 86 A100s,
    per model, with Baseline-H100 40 and 1.4x of it (the paper's figure) as lines."""
    runs = sorted(out.glob("isocost-conv_variants_paper_*_12000s_conv.json"))
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for path, color in zip(runs, ("C0", "C1", "C2"), strict=False):
        res = json.loads(path.read_text())
        model = path.stem.split("_")[3]
        # The default variant only: 2048-token budget, A100 reference, a bisected rate.
        pts = sorted(
            (int(r["design"].split()[1].split("P")[0]), r["rate"])
            for r in res["runs"]
            if r["design"].startswith("Splitwise-AA")
            and r.get("prompt_budget", 2048) == 2048
            and r.get("reference", "a100-80gb") == "a100-80gb"
            and "rate" in r
        )
        base = res["baseline_h100_40_rate"]
        ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=f"Splitwise-AA, {model}")
        ax.axhline(base, color=color, ls=":", lw=1, label=f"Baseline-H100 40, {model}")
        ax.axhline(1.4 * base, color=color, ls="--", lw=1, label=f"1.4x Baseline-H100, {model}")
    # SplitwiseSim's iso-cost sweep rates stop here (splitwise_aa_isocost.yaml: 50-180 req/s).
    ax.axhline(180, color="grey", lw=2, alpha=0.3, label="top of SplitwiseSim's iso-cost rates")
    ax.axvline(51, color="k", lw=0.8, alpha=0.5)
    ax.text(51.3, ax.get_ylim()[0], " paper's split 51P+35T", fontsize=7, va="bottom")
    ax.set_xlabel("prompt machines of 86 DGX-A100s (the rest token machines)")
    ax.set_ylabel("throughput within SLO (req/s)")
    ax.set_title("iso-cost, conversation trace, 12,000 sampled requests", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "isocost_conv_splits.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plots(out: Path) -> list[Path]:
    """Throughput against split per family, and normalised bars per experiment."""
    made = []
    conv_splits = isocost_conv_plot(out)
    if conv_splits is not None:
        made.append(conv_splits)
    for exp in ("isopower", "isocost"):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
        for ax, s in zip(axes, SETTINGS, strict=True):
            r = _load(out, exp, s)
            if r is None:
                continue
            for fam in FAMS:
                if fam not in r["families"]:
                    continue
                tried = sorted(r["families"][fam]["tried"], key=lambda t: t["prefill"])
                if fam.startswith("Baseline"):
                    style = "--" if fam == "Baseline-A" else ":"
                    label = f"{fam} ({tried[0]['machines']})"
                    ax.axhline(tried[0]["rate"], color="k", ls=style, lw=1, label=label)
                    continue
                frac = [t["prefill"] / t["machines"] for t in tried]
                ax.plot(frac, [t["rate"] for t in tried], marker="o", ms=3, label=fam)
            ax.set_title(f"{exp}, {s} setting")
            ax.set_xlabel("prompt machines / all machines")
            ax.set_ylabel("throughput within SLO (req/s)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out / f"{exp}_splits.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    fig, ax = plt.subplots(figsize=(11, 4.6))
    labels, paper_v, ours_v, faithful_v, notebook_v, sampled_v = [], [], [], [], [], []
    conv_v, conv_sampled_v = [], []
    for exp, fam, base, q, val in PAPER:
        labels.append(f"{exp}\n{fam.split('-')[1]}/{base.split('-')[1]} {q}")
        paper_v.append(val)
        faithful_v.append(_ratio(_load(out, exp, "paper"), fam, base, q) or 0.0)
        ours_v.append(_ratio(_load(out, exp, "ours"), fam, base, q) or 0.0)
        thr = q == "throughput"
        notebook_v.append(_design_ratio(out, exp, fam, base) if thr else 0.0)
        sampled_v.append(_design_ratio(out, exp, fam, base, "_12000s") if thr else 0.0)
        # The conversation trace: the notebook's iso-power designs for it, and the searched
        # iso-throughput designs (bench_paper.py ... --trace conv).
        if exp == "isothroughput":
            conv = _ratio(_load(out, exp, "paper_conv"), fam, base, q) or 0.0
            conv_v.append(conv)
            conv_sampled_v.append(0.0)
        else:
            cexp = f"{exp}-conv"
            conv_v.append(_design_ratio(out, cexp, fam, base, "_conv"))
            conv_sampled_v.append(_design_ratio(out, cexp, fam, base, "_12000s_conv"))
    xs = range(len(labels))
    w = 0.12
    bars = (
        (paper_v, "paper"),
        (sampled_v, "code: paper setting, notebook's designs, SplitwiseSim-style traces (A)"),
        (notebook_v, "code: paper setting, notebook's designs, first 3000 (B)"),
        (faithful_v, "code: paper setting, searched designs (C)"),
        (ours_v, "code: batonserve setting, searched (D)"),
        (conv_sampled_v, "conversation: paper setting, notebook's designs, SplitwiseSim-style (E)"),
        (conv_v, "conversation: paper setting, notebook's designs first 3000 / searched (F)"),
    )
    for i, (vals, label) in enumerate(bars):
        ax.bar([x + (i - 3) * w for x in xs], vals, w, label=label)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ratio to the baseline")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = out / "ratios.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    made.append(p)
    return made


def write_report(out: Path) -> None:
    """Print the tables and write the plots."""
    print(tables(out))
    for p in plots(out):
        print(f"plot: {p}")

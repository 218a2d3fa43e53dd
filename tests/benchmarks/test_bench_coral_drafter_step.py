"""The drafter-step benchmark runs with one command and writes JSON, markdown and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_preset_writes_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_coral_drafter_step.py"),
         "--preset", "smoke", "--reps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "coral_drafter_step.json").read_text())
    # smoke grid: T in {1, 4}, each 1 dense + (N=8) x (k in {1, 2}) routed rows
    assert [r["provider"] for r in result["rows"]] == ["dense", "routed", "routed"] * 2
    for r in result["rows"]:
        assert r["us"] > 0 and r["head_us"] > 0 and r["body_us"] > 0
        if r["provider"] == "routed":
            assert 1 <= r["union_groups"] <= min(8, r["T"] * r["k"])
    md = (tmp_path / "coral_drafter_step.md").read_text()
    assert md.count("\n| tiny |") == len(result["rows"])
    assert (tmp_path / "coral_drafter_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

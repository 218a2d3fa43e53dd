"""The trainer-memory benchmark traces every step of each arm and writes JSON, markdown and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_two_arms_write_a_trace_per_step(target_path, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trainer_memory.py"), "--variant", "eagle",
                           "--steps", "3", "--epochs", "1", "--batch-tokens", "1024", "--arms", "shipped", "none",
                           "--target", str(target_path), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "trainer_memory.json").read_text())
    assert [r["arm"] for r in result["rows"]] == ["shipped", "none"]
    for arm, trace in result["traces"].items():
        assert [t["step"] for t in trace] == [0, 1, 2, 3], arm
        assert all(t["rss_anon_mb"] > 0 for t in trace)
    row = result["rows"][1]
    assert row["rss_max_mb"] == max(t["rss_anon_mb"] for t in result["traces"]["none"][1:]) and row["seconds_per_step"] > 0
    assert "| none |" in (tmp_path / "trainer_memory.md").read_text()
    assert (tmp_path / "trainer_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The trainer-throughput benchmark runs with one command and writes JSON, markdown and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_preset_writes_results(target_path, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trainer.py"), "--preset", "smoke",
                           "--batch-tokens", "1024", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_trainer.json").read_text())
    runs = [(r["recipe"], r["dtype"], r["steps"]) for r in result["runs"]]
    assert runs == [("eagle", "float32", 2), ("eagle-v8k", "float32", 2)]
    assert result["summary"][0]["median"] == result["runs"][0]["tokens_per_second"] > 0
    assert result["summary"][0]["vs_base"] == 1.0 and result["summary"][1]["base"] == "eagle"
    assert result["summary"][1]["vs_base"] == result["runs"][1]["tokens_per_second"] / result["runs"][0]["tokens_per_second"]
    assert "| eagle | float32 |" in (tmp_path / "bench_trainer.md").read_text()
    assert (tmp_path / "bench_trainer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

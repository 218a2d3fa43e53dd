"""The small-LM step benchmark runs in real vLLM with one command and writes JSON, markdown and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_smoke_preset_writes_results(target_path, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_small_lm_step.py"), "--target", str(target_path),
         "--preset", "smoke", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "small_lm_step.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["target (first)", "1 layers x 288", "target (last)"]
    drafter = result["rows"][1]
    assert drafter["params"] == 49152 * 288 + 288 + (2 * 288 + 2 * 576 * 288 + 2 * 192 * 288 + 3 * 1536 * 288)
    for r in result["rows"]:
        assert r["median_ms"] > 0
    # a 1-layer drafter at half width reads ~11% of the target's weights per step
    assert drafter["ratio"] < 0.8, result
    assert (tmp_path / "small_lm_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

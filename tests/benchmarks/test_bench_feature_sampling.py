"""The feature-sampling benchmark runs with one command and writes JSON, markdown and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_preset_writes_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_feature_sampling.py"),
         "--preset", "smoke", "--reps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "feature_sampling.json").read_text())
    assert result["device"] and result["dtype"] == "bfloat16"
    providers = {r["provider"] for r in result["rows"]}
    assert providers == {"gemm", "twin", "triton"}
    # smoke grid: one tiny shape (H=64, I=160), T in {1, 4}: 2 cases per provider
    assert len(result["rows"]) == 2 * len(providers)
    cuda = torch.cuda.is_available()
    for r in result["rows"]:
        H, I, T = r["H"], r["I"], r["T"]
        # compulsory bytes, bf16: both weights, E[x], h, the norm weight, g, and int64 ids
        assert r["bytes"] == (2 * I * H + 2 * T * H + H + T * I) * 2 + 8 * T
        assert r["saved_bytes"] == (4 * T * H + 6 * T * I) * 2
        if r["provider"] == "triton" and not cuda:
            assert r["us"] is None and "no CUDA" in r["skipped"]
        else:
            assert r["us"] > 0 and r["gbps"] > 0 and (r["us_graph"] is not None) == cuda
    md = (tmp_path / "feature_sampling.md").read_text()
    assert md.count("\n| tiny | 64 | 160 |") == len(result["rows"])
    assert ("`triton` skipped: no CUDA" in md) != cuda
    png = (tmp_path / "feature_sampling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

"""The recipe study runs with one command, resumes, and writes JSON, markdown and a PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from recipe_study import tau  # noqa: E402


def test_tau_is_the_expected_accepted_length_of_a_chain():
    assert tau([0.5, 0.5, 0.5], 3) == 1 + 0.5 + 0.25 + 0.125
    assert tau([1.0, 1.0], 2) == 3.0 and tau([0.0, 1.0], 2) == 1.0 and tau([0.7], 3) == 1.7


@pytest.mark.slow
def test_two_rows_train_score_and_resume(target_path, tiny_features, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recipe_study.py"), "--target", str(target_path),
           "--features", str(tiny_features), "--heldout", str(tiny_features), "--runs", str(tmp_path / "runs"),
           "--out", str(tmp_path / "out"), "--max-steps", "2", "--batch-tokens", "512", "--eval-unroll", "2",
           "--dtype", "float32", "--only", "eagle", "eagle3-u3-v8k"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "recipe_study.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"eagle", "eagle3-u3-v8k"}
    for r in rows.values():
        assert r["steps"] == 2 and len(r["accept"]) == 2 and r["cpu_hours"] > 0
        assert r["tau"]["2"] == pytest.approx(tau(r["accept"], 2))
        assert r["heldout"]["acc/top1_step2"] == r["accept"][1]
    assert "| eagle3-u3-v8k |" in (tmp_path / "out" / "recipe_study.md").read_text()
    assert (tmp_path / "out" / "recipe_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # finished rows are skipped
    assert again.returncode == 0 and "train eagle" not in again.stderr
    assert json.loads((tmp_path / "out" / "recipe_study.json").read_text())["rows"] == result["rows"]

    # The data-size ablation: the same row on a half of the conversations, beside the full one.
    half = subprocess.run(cmd[:-2] + ["eagle", "--data-fractions", "0.5", "1"], capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert half.returncode == 0, half.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((tmp_path / "out" / "recipe_study.json").read_text())["rows"]}
    assert set(rows) == {"eagle", "eagle@0.5", "eagle3-u3-v8k"} and rows["eagle"] == result["rows"][0]
    assert rows["eagle@0.5"]["data_fraction"] == 0.5 and rows["eagle@0.5"]["sequences"] == rows["eagle"]["sequences"] // 2
    assert (tmp_path / "runs" / "eagle-f0.5" / "drafter").is_dir()

    # --score: finished rows are scored on another set from their run folders (here the same
    # features, so the same numbers), and a row rebuilt from a finished run keeps its throughput.
    (tmp_path / "out" / "recipe_study.json").unlink()
    scored = subprocess.run(cmd[:-2] + ["eagle", "--score", f"again={tiny_features}"], capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "recipe_study.json").read_text())
    (row,) = result["rows"]
    assert row["scores"]["again"]["accept"] == pytest.approx(row["accept"]) and row["tokens_per_second"] > 0
    assert list(result["score_sets"]) == ["again"] and str(tiny_features).endswith(result["score_sets"]["again"])
    assert "## Scored on again" in (tmp_path / "out" / "recipe_study.md").read_text()
    bad = subprocess.run(cmd + ["--score", "no-equals-sign"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected NAME=FEATURES" in bad.stderr


def test_a_scoring_set_the_rows_cannot_read_fails_before_training(target_path, tiny_features, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recipe_study.py"), "--target", str(target_path),
           "--features", str(tiny_features), "--heldout", str(tiny_features), "--runs", str(tmp_path / "runs"),
           "--out", str(tmp_path / "out"), "--max-steps", "1", "--only", "eagle3-u3-v8k",
           "--score", f"missing={tmp_path / 'nothing'}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "cannot score eagle3-u3-v8k rows" in proc.stderr
    assert "index.json" in proc.stderr.strip().splitlines()[-1] and not (tmp_path / "runs").exists()

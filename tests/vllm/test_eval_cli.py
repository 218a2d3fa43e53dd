"""``vllm-coral eval`` end to end: engines for the target and a drafter, tables, plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_eval_cli_writes_results(target_path, tmp_path):
    from vllm_coral.models.eagle import EagleConfig, EagleDrafter

    cfg = EagleConfig.from_target(json.loads((target_path / "config.json").read_text()))
    ckpt = EagleDrafter(cfg).save(tmp_path / "random-drafter")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "turns": ["What is 2+2?"]}) + "\n{not json\n"
                         + json.dumps({"question_id": 2, "turns": ["Name a color."]}) + "\n")
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_coral.cli", "eval", "--target", str(target_path),
         "--drafter", f"random={ckpt}", "--questions", str(questions), "--max-tokens", "12",
         "--k", "2", "--batch-size", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "eval.json").read_text())
    rows = result["results"]["q"]
    assert [r["name"] for r in rows] == ["target", "random"]
    assert rows[1]["identical"] == 2  # lossless at T=0 whatever the drafter proposes
    assert rows[1]["num_prompts"] == 2 and "q.jsonl:2: invalid JSON" in proc.stderr  # bad line skipped, reported
    assert len(rows[1]["acceptance_per_position"]) == 2
    assert "| random |" in (out / "eval.md").read_text()
    assert (out / "acceptance.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_rejects_bad_drafter(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_coral.cli", "eval", "--drafter", f"x={tmp_path}", "--questions", "q.jsonl"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "expected NAME=CHECKPOINT_DIR with a config.json" in proc.stderr

"""divergence_margins.py replays a guard mismatch in fp32 and measures the logit gap.

The mismatch is planted where the answer is known: at the context's next position the
"target" token is the true argmax and the "speculative" one the runner-up, so the script
must report rank 1 and a gap equal to top-1 minus top-2, computed here independently.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_replays_a_planted_near_tie(target_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_path)
    ctx = tok.apply_chat_template([{"role": "user", "content": "Name a color."}], add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ctx])).logits[0, -1]
    top = torch.topk(logits, 2)
    mismatch = {"request": "q1/turn1", "position": 0, "expected": int(top.indices[0]), "got": int(top.indices[1]),
                "expected_len": 5, "got_len": 5, "context_token_ids": list(ctx)}  # fmt: skip
    run = {"kind": "offline", "config": {"dtype": "bfloat16"},
           "rows": [{"dataset": "d", "method": "EAGLE", "guard": {"compared": 1, "identical": 0,
                                                                 "mismatches": [mismatch]}}]}  # fmt: skip
    (tmp_path / "bench_offline.json").write_text(json.dumps(run))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "divergence_margins.py"), str(tmp_path / "bench_offline.json"),
         "--target", str(target_path), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    [case] = json.loads((tmp_path / "divergence_margins.json").read_text())["cases"]
    assert case["got_rank"] == 1 and case["top1"] == mismatch["expected"] and not case["inherited"]
    assert abs(case["gap_expected_got"] - float(top.values[0] - top.values[1])) < 1e-4
    assert (tmp_path / "divergence_margins.png").read_bytes()[:4] == b"\x89PNG"

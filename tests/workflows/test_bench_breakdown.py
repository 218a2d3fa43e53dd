"""Where the time goes: step cost and step phases from rows of known values."""

from __future__ import annotations

import pytest

from vllm_coral.workflows.bench.breakdown import format_phases, plot_phases, step_phases

PNG = b"\x89PNG\r\n\x1a\n"


def _row(method="EAGLE", seconds=2.0, tokens=150, **kw):
    phases = {"steps": 100, "seconds": {"preprocess": 0.05, "forward": 1.2, "postprocess": 0.1, "sample": 0.05,
                                        "draft": 0.4, "bookkeep": 0.0, "other": 0.0},
              "counts": {"forward": 100}}  # fmt: skip
    return {"dataset": "mt_bench", "method": method, "kind": "eagle", "temperature": 0.0, "seconds": seconds,
            "output_tokens": tokens, "phases": phases, **kw}  # fmt: skip


def test_step_phases_worked_example():
    sp = step_phases(_row())
    # Docstring example: 2.0 s, 100 steps -> target 13 ms, drafter 4 ms, outside 2.0 - 1.8 = 0.2 s.
    assert sp["steps"] == 100 and sp["tokens"] == 150
    assert sp["seconds"]["target"] == pytest.approx(1.3) and sp["seconds"]["drafter"] == pytest.approx(0.4)
    assert sp["seconds"]["runner other"] == pytest.approx(0.05)
    assert sp["seconds"]["outside runner"] == pytest.approx(0.2)
    assert step_phases(_row(error="boom")) is None and step_phases({**_row(), "phases": None}) is None


def test_table_and_plot(tmp_path):
    rows = [_row("target", seconds=1.5, tokens=100), _row(), {**_row("CORAL"), "temperature": 1.0}]
    md = format_phases(rows)
    # 100 steps: target 13.00 ms, drafter 4.00, sample 0.50, runner 0.50, outside 2.00; 20 ms/step; 150 tokens.
    assert "| mt_bench | EAGLE | 100 | 1.50 | 13.00 | 4.00 | 0.50 | 0.50 | 2.00 | 20.00 | 13.33 |" in md
    assert "CORAL" not in md  # T=0 only
    assert plot_phases(rows, tmp_path / "phases.png") and (tmp_path / "phases.png").read_bytes().startswith(PNG)
    assert not plot_phases([{**_row(), "phases": None}], tmp_path / "none.png")


def test_repeats_sum_their_phases_and_the_report_shows_them(tmp_path):
    from vllm_coral.workflows.bench.report import aggregate_repeats, write_report

    reps = [{**_row(), "repeat": r, "speedup": 0.9, "tokens_per_second": 75.0, "requests": 4} for r in range(2)]
    merged = aggregate_repeats(reps)[0]
    assert merged["phases"]["steps"] == 200 and merged["phases"]["seconds"]["draft"] == pytest.approx(0.8)
    assert step_phases(merged)["seconds"]["outside runner"] == pytest.approx(0.4)
    written = write_report([{"kind": "offline", "rows": reps}], tmp_path)
    assert "| mt_bench | EAGLE | 200 | 1.50 | 13.00 | 4.00 |" in (tmp_path / "summary.md").read_text()
    assert tmp_path / "phases.png" in written

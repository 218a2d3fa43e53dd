"""The k sweep: which rows expand, how sweeps are grouped, and how the best k is chosen."""

from __future__ import annotations

import pytest

from vllm_coral.workflows.bench.sweep import expand_k, format_k_sweep, k_sweeps, plot_k_sweep

PNG = b"\x89PNG"


def test_expand_k_worked_example():
    target = {"name": "target", "method": "none"}
    eagle = {"name": "eagle", "method": "eagle", "checkpoint": "c"}
    fixed = {"name": "coral k=5", "method": "coral", "checkpoint": "d", "num_speculative_tokens": 5}
    out = expand_k([target, eagle, fixed, "bad --method"], [2, 3])
    assert out == [target, {**eagle, "name": "eagle k=2", "num_speculative_tokens": 2},
                   {**eagle, "name": "eagle k=3", "num_speculative_tokens": 3}, fixed, "bad --method"]
    assert expand_k([target, eagle], [4]) == [target, eagle]  # one k: unchanged (the default k applies)
    assert expand_k([{"method": "ngram"}], [2, 3])[1]["name"] == "ngram k=3"  # unnamed: the method's name


def _row(method, k, speedup, *, dataset="mt", t=0.0, ckpt="c", rng=None, error=None):
    return {"dataset": dataset, "temperature": t, "method": method, "draft_sample_method": "greedy", "error": error,
            "num_speculative_tokens": k, "speedup": speedup, "speedup_range": rng, "mean_acceptance_length": 1.3,
            "speculative_config": {"method": "eagle", "model": ckpt, "num_speculative_tokens": k}}


def test_sweeps_group_rows_that_differ_only_in_k_and_pick_the_best_median():
    rows = [{"dataset": "mt", "temperature": 0.0, "method": "target", "speculative_config": None, "speedup": 1.0},
            _row("eagle k=2", 2, 0.95, rng=[0.93, 0.97]), _row("eagle k=3", 3, 0.97), _row("eagle k=4", 4, 0.97),
            _row("hass k=2", 2, 0.90, ckpt="h"), _row("hass k=3", 3, None, ckpt="h", error="boom"),
            _row("lone", 3, 0.99, ckpt="x"), _row("eagle k=2", 2, 0.80, dataset="gsm")]  # fmt: skip
    sweeps = k_sweeps(rows)
    # hass has one usable k and gsm one row: neither is a sweep; the tie 0.97 goes to the smaller k.
    assert [(s["method"], s["dataset"], [p["k"] for p in s["points"]], s["best_k"]) for s in sweeps] == [
        ("eagle", "mt", [2, 3, 4], 3)]
    md = format_k_sweep(rows)
    assert "| mt | 0 | eagle | 0.95x (τ 1.30) | 0.97x (τ 1.30) | 0.97x (τ 1.30) | 3 |" in md
    assert format_k_sweep(rows[:2]) == ""


def test_k_sweep_plot(tmp_path):
    rows = [_row("eagle k=2", 2, 0.95, rng=[0.9, 1.0]), _row("eagle k=3", 3, 0.97)]
    assert plot_k_sweep(rows, tmp_path / "k.png") and (tmp_path / "k.png").read_bytes()[:4] == PNG
    assert not plot_k_sweep(rows[:1], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("argv", [["-k", "2", "3"], ["--num-speculative-tokens", "4"]])
def test_cli_takes_one_or_several_k(argv):
    import argparse

    from vllm_coral.cli.bench import add_bench_commands

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "offline", "--questions", "q.jsonl", "--out", "o", *argv])
    assert args.k == [int(v) for v in argv[1:]]


def test_report_shows_the_sweep(tmp_path):
    from vllm_coral.workflows.bench.report import write_report

    rows = [{**_row(f"eagle k={k}", k, s), "kind": "eagle", "requests": 2, "output_tokens": 10, "seconds": 1.0,
             "tokens_per_second": 10.0, "acceptance_per_position": []} for k, s in ((2, 0.9), (3, 0.95))]
    written = write_report([{"kind": "offline", "rows": rows}], tmp_path)
    assert tmp_path / "k_sweep.png" in written
    assert "## k sweep" in (tmp_path / "summary.md").read_text()

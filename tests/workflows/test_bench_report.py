"""Run JSON, merged markdown tables and plots, from rows of known values."""

from __future__ import annotations

import json

import pytest

from vllm_coral.workflows.bench.offline import OfflineRow
from vllm_coral.workflows.bench.report import load_runs, run_metadata, write_report, write_run
from vllm_coral.workflows.bench.serve import RequestTiming, ServeRow, percentiles, summarize_level

PNG = b"\x89PNG\r\n\x1a\n"


def _offline_rows(dataset="mt_bench"):
    target = OfflineRow(dataset, "target", "none", 0.0, None, None, None, requests=4, output_tokens=400, seconds=4.0,
                        tokens_per_second=100.0, speedup=1.0)  # fmt: skip
    eagle = OfflineRow(dataset, "EAGLE", "eagle", 0.0, "greedy", 3, {"method": "eagle"}, requests=4, output_tokens=400,
                       seconds=5.0, tokens_per_second=80.0, speedup=0.8, mean_acceptance_length=1.5,
                       acceptance_per_position=[0.35, 0.1, 0.05], draft_acceptance_rate=0.1667,
                       guard={"compared": 4, "identical": 4, "mismatches": []})  # fmt: skip
    eagle.output_tokens, eagle.spec_counters = 100, {"num_drafts": 60, "num_accepted_tokens": 25}
    hot = OfflineRow(dataset, "EAGLE", "eagle", 1.0, "probabilistic", 3, {"method": "eagle"}, requests=4,
                     output_tokens=380, seconds=5.0, tokens_per_second=76.0, speedup=0.8, mean_acceptance_length=1.3,
                     acceptance_per_position=[0.2, 0.07, 0.03], draft_acceptance_rate=0.1)  # fmt: skip
    broken = OfflineRow(dataset, "CORAL", "coral", 0.0, "greedy", 3, {"method": "eagle"}, error="vLLM engine failed: boom")
    return [target, eagle, hot, broken]


def _serve_rows():
    rows = []
    for method, kind, tps in (("target", "none", [40.0, 90.0, 150.0]), ("EAGLE", "eagle", [30.0, 70.0, 120.0])):
        for c, t in zip((1, 4, 16), tps):
            rows.append(ServeRow("mt_bench", method, kind, 0.0, None, None, c, requests=8, output_tokens=int(8 * t),
                                 seconds=8.0, requests_per_second=1.0, tokens_per_second=t,
                                 speedup=t / {1: 40.0, 4: 90.0, 16: 150.0}[c],
                                 ttft_ms={"p50": 50.0, "p90": 80.0, "p99": 99.0, "mean": 55.0},
                                 itl_ms={"p50": 20.0, "p90": 30.0, "p99": 40.0, "mean": 22.0},
                                 tpot_ms={"p50": 21.0, "p90": 31.0, "p99": 41.0, "mean": 23.0},
                                 mean_acceptance_length=1.4 if kind != "none" else None))  # fmt: skip
    return rows


def test_write_run_and_merge(tmp_path):
    meta = run_metadata(["vllm-coral", "bench", "offline"])
    assert meta["git_sha"] and "torch" in meta["versions"] and meta["device"].startswith("CPU")
    off = write_run(tmp_path / "a", "offline", _offline_rows(), {"max_tokens": 128}, meta)
    srv = write_run(tmp_path / "b", "serve", _serve_rows(), {"concurrency": [1, 4, 16]}, meta)
    run = json.loads(off.read_text())
    assert run["kind"] == "offline" and run["meta"]["command"] == "vllm-coral bench offline" and len(run["rows"]) == 4
    md = (tmp_path / "a" / "bench_offline.md").read_text()
    assert "| mt_bench | 0 | EAGLE | greedy | 3 | 4 | 80.0 | 0.80x | 1.50 | 0.35 0.10 0.05 | 0.17 | 4/4 |" in md
    assert "| mt_bench | 1 | EAGLE | probabilistic |" in md
    assert "error: vLLM engine failed: boom" in md
    assert "| EAGLE | 0.80x · τ 1.50 · 4/4 |" in md  # headline, T=0
    assert "| EAGLE (probabilistic) | 0.80x · τ 1.30 |" in md  # headline, T=1 names the sampling mode
    # Step cost: 100 tokens, 25 accepted -> 75 steps, 60 drafted (80%), τ_all 4/3, 0.8x -> 1.67.
    assert "| mt_bench | EAGLE | 80% | 1.33 | 0.80x | 1.67 |" in md
    for name in ("tau.png", "acceptance.png", "speedup.png"):
        assert (tmp_path / "a" / name).read_bytes().startswith(PNG)
    assert (tmp_path / "b" / "serve.png").read_bytes().startswith(PNG)

    # Merging: two offline datasets and a serve run in one summary.
    other = write_run(tmp_path / "c", "offline", _offline_rows("gsm8k"), {}, meta)
    written = write_report(load_runs([off, other, tmp_path / "b"]), tmp_path / "all")
    summary = (tmp_path / "all" / "summary.md").read_text()
    assert "| T=0 | mt_bench | gsm8k |" in summary
    assert "| mt_bench | EAGLE | - | 16 | 1.00 | 120.0 | 0.80x | 50/80/99 | 20/30/40 | 21 | 1.40 |" in summary
    assert {p.name for p in written} == {"summary.md", "tau.png", "acceptance.png", "speedup.png", "serve.png"}
    assert srv.exists()


def test_repeats_are_merged_per_run(tmp_path):
    from dataclasses import replace

    from vllm_coral.workflows.bench.offline import fill_speedups
    from vllm_coral.workflows.bench.report import aggregate_repeats

    rows = []
    for rep, (base, eagle) in enumerate(((100.0, 90.0), (80.0, 76.8), (120.0, 111.6))):  # 0.90, 0.96, 0.93
        target, ok, _, broken = _offline_rows()
        rows += [replace(target, tokens_per_second=base, repeat=rep), replace(ok, tokens_per_second=eagle, repeat=rep),
                 replace(broken, repeat=rep)]  # fmt: skip
    rows[4].spec_counters = {"num_drafts": 40, "num_draft_tokens": 120, "num_accepted_tokens": 30,
                             "accepted_per_pos": [20, 8, 2]}  # fmt: skip
    for r in rows[1::3]:
        r.spec_counters = r.spec_counters if r.repeat == 1 else {"num_drafts": 60, "num_draft_tokens": 180,
                                                                  "num_accepted_tokens": 25, "accepted_per_pos": [20, 4, 1]}
    fill_speedups(rows, key=lambda r: (r.dataset, r.temperature, r.repeat))
    merged = aggregate_repeats([r.to_dict() for r in rows])
    assert [(m["method"], m.get("repeats")) for m in merged] == [("target", 3), ("EAGLE", 3), ("CORAL", None)]
    eagle = merged[1]
    assert eagle["speedup"] == pytest.approx(0.93) and eagle["speedup_range"] == pytest.approx([0.90, 0.96])
    # τ from the summed counters: 1 + (25 + 30 + 25) / (60 + 40 + 60) = 1.5; position 1: 60/160.
    assert eagle["mean_acceptance_length"] == pytest.approx(1.5)
    assert eagle["acceptance_per_position"][0] == pytest.approx(60 / 160)
    assert merged[2]["error"] == "vLLM engine failed: boom"
    assert aggregate_repeats(merged) == merged  # idempotent
    run = write_run(tmp_path, "offline", rows, {"repeats": 3}, run_metadata([]))
    md = (tmp_path / "bench_offline.md").read_text()
    assert "| EAGLE | 0.93x [0.90-0.96] · τ 1.50 · 4/4 |" in md
    assert len(json.loads(run.read_text())["rows"]) == 9  # the JSON keeps every repeat
    assert (tmp_path / "speedup.png").read_bytes().startswith(PNG)


def test_load_runs_rejects_what_is_not_a_run(tmp_path):
    (tmp_path / "x.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="not a benchmark run"):
        load_runs([tmp_path / "x.json"])
    (tmp_path / "y.json").write_text("{trunc")
    with pytest.raises(ValueError, match="not a readable benchmark run"):
        load_runs([tmp_path / "y.json"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no bench_"):
        load_runs([tmp_path / "empty"])


def test_percentiles_and_level_summary():
    # numpy's linear interpolation on [1, 2, 3, 4] s: p50 = 2.5, p90 = 3.7, p99 = 3.97.
    assert percentiles([1.0, 2.0, 3.0, 4.0]) == pytest.approx({"p50": 2500, "p90": 3700, "p99": 3970, "mean": 2500})
    assert percentiles([]) == {}
    timings = [RequestTiming("a", ttft=0.1, latency=1.1, output_tokens=11, itl=[0.1] * 10),
               RequestTiming("b", ttft=0.3, latency=0.5, output_tokens=3, itl=[0.1, 0.1])]  # fmt: skip
    row = ServeRow("d", "m", "eagle", 0.0, None, None, 2)
    summarize_level(row, timings, seconds=2.0)
    assert (row.requests, row.output_tokens, row.requests_per_second, row.tokens_per_second) == (2, 14, 1.0, 7.0)
    assert row.ttft_ms["mean"] == pytest.approx(200.0)
    # TPOT: (1.1 - 0.1) / 10 = 0.1 s and (0.5 - 0.3) / 2 = 0.1 s.
    assert row.tpot_ms["p50"] == pytest.approx(100.0)
    assert row.itl_ms["p99"] == pytest.approx(100.0)


def test_report_cli_merges_runs(tmp_path, capsys):
    from vllm_coral.cli import main

    meta = run_metadata([])
    write_run(tmp_path / "a", "offline", _offline_rows(), {}, meta)
    write_run(tmp_path / "b", "serve", _serve_rows(), {}, meta)
    assert main(["bench", "report", str(tmp_path / "a"), str(tmp_path / "b" / "bench_serve.json"),
                 "--out", str(tmp_path / "all")]) == 0  # fmt: skip
    assert "summary.md" in capsys.readouterr().out
    assert "## Served" in (tmp_path / "all" / "summary.md").read_text()
    assert main(["bench", "report", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "x")]) == 2
    assert "vllm-coral: error:" in capsys.readouterr().err


def test_results_hold_no_absolute_paths():
    from vllm_coral.workflows.bench.report import portable

    got = portable({"meta": {"command": "vllm-coral bench offline --out /abs/x/r/off --k 3"},
                    "rows": [{"speculative_config": {"model": "/abs/checkpoints/smollm2-135m/eagle"}, "tau": 1.5}],
                    "text": "a/b relative", "n": 3})  # fmt: skip
    assert got == {"meta": {"command": "vllm-coral bench offline --out r/off --k 3"},
                   "rows": [{"speculative_config": {"model": "smollm2-135m/eagle"}, "tau": 1.5}],
                   "text": "a/b relative", "n": 3}  # fmt: skip
    # paths after "name=" and inside a JSON method row, as `bench --questions/--method` record them
    got = portable({"questions": ["mt_bench=/abs/data/q/mt.jsonl"],
                    "command": 'bench --method {"checkpoint": "/abs/runs/kd/drafter"}'})  # fmt: skip
    assert got == {"questions": ["mt_bench=q/mt.jsonl"], "command": 'bench --method {"checkpoint": "kd/drafter"}'}

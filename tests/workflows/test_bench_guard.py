"""The T=0 correctness guard: a deliberately corrupted output must be flagged, and where."""

from __future__ import annotations

from vllm_coral.workflows.bench.guard import compare_tokens
from vllm_coral.workflows.bench.report import format_headline, format_offline

REFERENCE = {"81/turn1": [5, 6, 7, 8], "81/turn2": [1, 2], "82/turn1": [9, 9, 9]}


def test_identical_outputs_pass():
    result = compare_tokens(REFERENCE, {k: list(v) for k, v in REFERENCE.items()})
    assert (result.compared, result.identical, result.mismatches) == (3, 3, [])
    assert result.ok


def test_corrupted_token_is_flagged_with_its_position():
    corrupted = {k: list(v) for k, v in REFERENCE.items()}
    corrupted["81/turn1"][2] = 1234
    result = compare_tokens(REFERENCE, corrupted)
    assert not result.ok and result.identical == 2
    [m] = result.mismatches
    assert (m.request, m.position, m.expected, m.got) == ("81/turn1", 2, 7, 1234)


def test_truncated_extended_and_missing_outputs_are_mismatches():
    candidate = {"81/turn1": [5, 6], "81/turn2": [1, 2, 3]}  # 82/turn1 missing
    result = compare_tokens(REFERENCE, candidate)
    by_request = {m.request: m for m in result.mismatches}
    assert result.identical == 0 and set(by_request) == set(REFERENCE)
    assert (by_request["81/turn1"].position, by_request["81/turn1"].expected, by_request["81/turn1"].got) == (2, 7, None)
    assert (by_request["81/turn2"].position, by_request["81/turn2"].expected, by_request["81/turn2"].got) == (2, None, 3)
    assert (by_request["82/turn1"].position, by_request["82/turn1"].got_len) == (0, 0)


def _row(method, kind, guard=None, speedup=None, tau=None):
    return {"dataset": "mt_bench", "method": method, "kind": kind, "temperature": 0.0, "draft_sample_method": None,
            "num_speculative_tokens": 3, "requests": 3, "tokens_per_second": 50.0, "speedup": speedup,
            "mean_acceptance_length": tau, "acceptance_per_position": [0.5, 0.2, 0.1] if tau else [],
            "draft_acceptance_rate": 0.27 if tau else None, "guard": guard, "error": None}  # fmt: skip


def test_mismatch_is_shown_in_the_tables():
    corrupted = {k: list(v) for k, v in REFERENCE.items()}
    corrupted["82/turn1"] = [9, 9, 8]
    guard = compare_tokens(REFERENCE, corrupted).to_dict()
    rows = [_row("target", "none"), _row("EAGLE", "eagle", guard, 0.7, 1.4)]
    table = format_offline(rows)
    assert "| 2/3 **MISMATCH** |" in table
    assert "0.70x · τ 1.40 · 2/3 **MISMATCH**" in format_headline(rows)


def test_mismatch_carries_the_context_to_replay_it():
    corrupted = {k: list(v) for k, v in REFERENCE.items()}
    corrupted["81/turn1"][2] = 1234
    prompts = {"81/turn1": [100, 101], "81/turn2": [102], "82/turn1": [103]}
    [m] = compare_tokens(REFERENCE, corrupted, prompts).mismatches
    assert m.context_token_ids == [100, 101, 5, 6]  # prompt + the target's output before position 2

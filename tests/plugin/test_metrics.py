"""Acceptance numbers from vLLM's metrics: worked examples by hand."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from vllm.v1.metrics.reader import Counter, Vector  # noqa: E402

from vllm_coral.plugin.metrics import SpecDecodeCounters  # noqa: E402


def _metrics(drafts, draft_tokens, accepted, per_pos):
    return [
        Counter(name="vllm:spec_decode_num_drafts", labels={}, value=drafts),
        Counter(name="vllm:spec_decode_num_draft_tokens", labels={}, value=draft_tokens),
        Counter(name="vllm:spec_decode_num_accepted_tokens", labels={}, value=accepted),
        Vector(name="vllm:spec_decode_num_accepted_tokens_per_pos", labels={}, values=per_pos),
        Counter(name="vllm:generation_tokens", labels={}, value=999),
    ]


def test_worked_example():
    # Two drafts of k=3 accepting [a, a, r] and [a, r, r]: per_pos [2, 1, 0], accepted 3.
    c = SpecDecodeCounters.from_metrics(_metrics(2, 6, 3, [2, 1, 0]))
    assert c.mean_acceptance_length == pytest.approx(2.5)
    assert c.draft_acceptance_rate == pytest.approx(0.5)
    assert c.acceptance_per_position == pytest.approx([1.0, 0.5, 0.0])


def test_difference_of_snapshots():
    before = SpecDecodeCounters.from_metrics(_metrics(2, 6, 3, [2, 1, 0]))
    after = SpecDecodeCounters.from_metrics(_metrics(6, 18, 12, [6, 4, 2]))
    run = after - before
    assert (run.num_drafts, run.num_accepted_tokens) == (4, 9)
    assert run.accepted_per_pos == (4, 3, 2)
    assert run.mean_acceptance_length == pytest.approx(1 + 9 / 4)


def test_no_speculation_gives_tau_one():
    c = SpecDecodeCounters.from_metrics([])
    assert c.mean_acceptance_length == 1.0 and c.acceptance_per_position == []


PROM = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 30.0
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 18.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 9.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 3.0
"""


def test_prometheus_text():
    c = SpecDecodeCounters.from_prometheus_text(PROM)
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (10, 30, 18)
    assert c.accepted_per_pos == (9, 6, 3)
    assert c.mean_acceptance_length == pytest.approx(2.8)

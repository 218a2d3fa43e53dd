"""The committed EAGLE, HASS and FSPAD drafters (checkpoints/smollm2-135m/, trained by
``vllm-coral train`` on target-regenerated ShareGPT conversations; FSPAD through the
plugin's adapter) in vLLM: T=0 output token-identical to the target alone, and acceptance
clearly above a random drafter's (τ = 1.00 here; the trained ones measured τ 1.3-1.4 on
MT-bench: small budget, see the README)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.demo import committed_drafters  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402

DRAFTERS = committed_drafters("smollm2-135m")
# FSPAD is served through the plugin's adapter, still as vLLM's "eagle" method. CORAL has its
# own tests (test_coral_vllm.py).
BASELINES = ("eagle", "hass", "fspad")


def test_baselines_are_committed():
    assert set(BASELINES) <= set(DRAFTERS)


@pytest.mark.parametrize("name", BASELINES)
def test_trained_baseline_is_lossless_and_accepts(name, target_path, target_greedy):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    spec = {"method": "eagle", "model": str(DRAFTERS[name]), "num_speculative_tokens": 3}
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        run = timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert run.token_ids == target_greedy.token_ids
    print(f"{name}: tau {run.spec.mean_acceptance_length:.3f}, per position {run.spec.acceptance_per_position}")
    assert run.spec.mean_acceptance_length > 1.1, run.spec

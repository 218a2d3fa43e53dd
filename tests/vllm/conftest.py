"""Shared real-vLLM fixtures: engines are expensive (~20 s each), so runs are shared."""

from __future__ import annotations

import pytest

PROMPTS = [
    "What is 2+2?",
    "Write a haiku about autumn leaves.",
    "Name three primary colors.",
    "Explain what a CPU does in one sentence.",
]
CONVERSATIONS = [[{"role": "user", "content": p}] for p in PROMPTS]
MAX_TOKENS = 48


@pytest.fixture(scope="session")
def target_greedy(target_path):
    """The target alone in vLLM at T=0 (fp32) on CONVERSATIONS: the reference outputs."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    with open_llm(**engine_kwargs(target_path, dtype="float32")) as llm:
        return timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))

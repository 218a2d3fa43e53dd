"""Our EAGLE checkpoint format is the one plain vLLM loads.

The drafter here has random weights: this proves the format and the lossless plumbing,
not a speedup (trained drafters are measured by the benchmarks). vLLM's loader fails on
any missing or unexpected weight name, so a clean load proves the weight-name map, and
vLLM's greedy verification must reproduce the target's output whatever the drafts are.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.models.eagle import EagleConfig, EagleDrafter  # noqa: E402
from vllm_coral.models.registry import save_drafter  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402


def test_plain_vllm_serves_our_eagle_checkpoint_losslessly(target_path, target_greedy, tmp_path, monkeypatch):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    target_config = json.loads((target_path / "config.json").read_text())
    torch.manual_seed(0)
    ckpt = save_drafter(EagleDrafter(EagleConfig.from_target(target_config)), tmp_path / "eagle-random",
                        family="eagle", recipe="eagle")

    # Plain vLLM: the engine and worker processes load no vllm-coral plugin at all.
    monkeypatch.setenv("VLLM_PLUGINS", "none")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    spec = {"method": "eagle", "model": str(ckpt), "num_speculative_tokens": 3}
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        run = timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert run.spec.num_drafts > 0, "vLLM did not speculate with the checkpoint"
    assert run.token_ids == target_greedy.token_ids

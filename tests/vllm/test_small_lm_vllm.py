"""The small-LM drafter served by plain vLLM (``"method": "draft_model"``, no plugin loaded).

The checkpoint is the target's first four layers with its embedding and final norm
(``init_from_target``, untrained): a real Llama drafter whose proposals are mostly, not
always, rejected, which is what both checks need.

- T=0, plain vLLM (``VLLM_PLUGINS=none``): output token-identical to the target alone,
  with drafts made; for the committed drafter (``checkpoints/smollm2-135m/small-lm``) too.
- T=1 with probabilistic drafting: the output distribution equals the target's
  (``stats.assert_same_distribution``: chi-square against the target alone, with the
  T=0.7 control that must be rejected). This one runs with vllm-coral's plugin loaded,
  as it is whenever the package is installed: on CPU, vLLM 0.32's rejection sampler
  verifies T>0 drafts with uninitialised temperatures (``plugin/patches.py``,
  ``rejection_sampler_expand``), and with ``VLLM_PLUGINS=none`` the same check fails
  (chi-square p ~ 1e-283; most outputs become token 0). At T=0, or on CUDA, no plugin is
  needed.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.demo import committed_drafters  # noqa: E402
from vllm_coral.models.registry import validate_drafter  # noqa: E402
from vllm_coral.models.small_lm import SmallLMConfig, SmallLMDrafter, init_from_target, save_small_lm  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402
from .stats import assert_same_distribution  # noqa: E402


@pytest.fixture(scope="module")
def early_exit(target_path, tmp_path_factory):
    from safetensors.torch import load_file

    config = SmallLMConfig.from_target(json.loads((target_path / "config.json").read_text()), num_hidden_layers=4)
    drafter = SmallLMDrafter(config)
    drafter.load_checkpoint_tensors(init_from_target(config, load_file(str(target_path / "model.safetensors")), range(4)))
    return save_small_lm(drafter, tmp_path_factory.mktemp("small_lm") / "drafter", target_path)


@pytest.fixture
def plain_vllm(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "none")  # no vllm-coral code in the engine
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # what the plugin's CPU defaults would set
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@pytest.mark.parametrize("which", ["early exit", "committed"])
def test_small_lm_greedy_is_token_identical(which, early_exit, target_path, target_greedy, plain_vllm):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    folder = early_exit if which == "early exit" else committed_drafters("smollm2-135m")["small-lm"]
    spec = validate_drafter(folder).speculative_config(3)
    assert spec["method"] == "draft_model"
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        run = timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    print(f"small-LM ({which}): {run.spec}")
    assert run.spec.num_drafts > 0, "vLLM did not speculate with the checkpoint"
    assert run.token_ids == target_greedy.token_ids


def test_small_lm_sampling_matches_target_distribution(early_exit, target_path):
    assert_same_distribution(target_path, validate_drafter(early_exit).speculative_config(3), "small-LM")

"""The committed CORAL drafter (routed LM head) in real vLLM through the plugin.

- T=0: output token-identical to the target alone, through both greedy drafting paths
  (argmax of ``compute_logits`` and the routed top-1 of ``get_top_tokens``).
- T=1 with probabilistic drafting: the output distribution equals the target's. Routing
  with k=1 group makes the drafter's proposal q (renormalised over one group) far from the
  target's p, so this only holds if q handed to the rejection sampler is exactly the
  distribution the drafts were sampled from. Two-sample chi-square test on the 2nd and 3rd
  generated tokens (the 1st comes from prefill, without speculation) against the target
  alone; a target run at T=0.7 is the positive control that the test can reject.
- A checkpoint whose group map is broken is refused at load with one line naming it.
"""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.demo import committed_drafters  # noqa: E402
from vllm_coral.models.registry import load_drafter, validate_drafter  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402
from .refusal import engine_start_failure_logs  # noqa: E402
from .stats import assert_same_distribution  # noqa: E402

CORAL = committed_drafters("smollm2-135m").get("coral")


def test_coral_checkpoint_is_committed():
    assert CORAL is not None, "checkpoints/smollm2-135m/coral is missing"
    assert json.loads((CORAL / "config.json").read_text())["architectures"] == ["EagleCoralLlamaForCausalLM"]


@pytest.mark.parametrize("local_argmax", [False, True], ids=["compute_logits", "get_top_tokens"])
def test_coral_greedy_is_token_identical(local_argmax, target_path, target_greedy):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    spec = validate_drafter(CORAL).speculative_config(3)
    spec["use_local_argmax_reduction"] = local_argmax
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        run = timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert run.token_ids == target_greedy.token_ids
    print(f"coral ({'get_top_tokens' if local_argmax else 'compute_logits'}): {run.spec}")
    assert run.spec.mean_acceptance_length > 1.1, run.spec  # the router keeps useful drafts


def test_coral_sampling_matches_target_distribution(target_path, tmp_path):
    ckpt = tmp_path / "coral-k1"
    shutil.copytree(CORAL, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vllm_coral"]["config"]["top_k"] = 1  # q far from p: one group of N
    (ckpt / "config.json").write_text(json.dumps(cfg))

    assert_same_distribution(target_path, validate_drafter(ckpt).speculative_config(3), "coral")


def test_broken_group_map_is_refused_at_load(target_path, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "coral-bad"
    shutil.copytree(CORAL, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["vocab_groups.row_to_token"][:2] = 0  # token 0 twice, another token missing
    save_file(tensors, str(ckpt / "model.safetensors"))
    spec = {"method": "eagle", "model": str(ckpt), "num_speculative_tokens": 3}
    logs = engine_start_failure_logs(target_path, spec)
    assert "CheckpointError: CORAL drafter" in logs and "bad group map vocab_groups.row_to_token" in logs
    # the header-only pre-flight check cannot see tensor values; loading the tensors does
    from vllm_coral.models.checkpoint import CheckpointError

    validate_drafter(ckpt)
    with pytest.raises(CheckpointError, match="not a permutation"):
        load_drafter(ckpt)

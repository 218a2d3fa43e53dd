"""CORAL on EAGLE-3 in real vLLM through the plugin (``Eagle3CoralLlamaForCausalLM``).

Random weights prove plumbing, not speed:
- T=0 output token-identical to the target alone, through both greedy drafting paths
  (argmax of ``compute_logits``, the routed top-1 of ``get_top_tokens``), with a draft
  vocabulary (vLLM's d2t mapping) and without one (the target's head, shared by vLLM);
- with every group selected (k = N) the routed drafter is the dense one: vLLM's counters
  (drafts, accepted per position) equal plain vLLM serving the same EAGLE-3 body;
- a checkpoint whose row map is broken is refused at load with one line naming it.

The committed CORAL-3 drafter (trained) also drafts usefully at T=0 and keeps the
target's output distribution at T=1 with probabilistic drafting (chi-square test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.models.coral3 import Coral3Drafter  # noqa: E402
from vllm_coral.models.eagle3 import Eagle3Config, Eagle3Drafter  # noqa: E402
from vllm_coral.models.registry import save_drafter, validate_drafter  # noqa: E402
from vllm_coral.models.target import TargetHead  # noqa: E402
from vllm_coral.models.vocab_groups import partition_vocab  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402
from .refusal import engine_start_failure_logs  # noqa: E402

CKPTS = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m"


def _coral3(target_path, out, *, draft_vocab=8192, n=16, k=2):
    """A random EAGLE-3 body (norms near 1), a frequency-like partition, a random router;
    returns (coral3 checkpoint, the body saved as a plain eagle3 checkpoint)."""
    torch.manual_seed(0)
    head = TargetHead.load(target_path)
    body = Eagle3Drafter(Eagle3Config.from_target(head.config, draft_vocab_size=draft_vocab))
    with torch.no_grad():
        for name, p in body.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    if draft_vocab:
        body.set_draft_vocab(torch.arange(draft_vocab) * 2, head.lm_head)
    rows = draft_vocab or head.vocab_size
    part = partition_vocab("frequency", n, token_counts=torch.randint(0, 100, (rows,)))
    coral = Coral3Drafter.from_eagle3(body, part, k)
    plain = save_drafter(body, out / "eagle3", family="eagle3", recipe="eagle3")
    return save_drafter(coral, out / f"coral3-n{n}-k{k}", family="coral3", recipe="coral-router"), plain


def _run(target_path, spec):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        return timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))


@pytest.mark.parametrize("draft_vocab,local_argmax", [(8192, False), (8192, True), (None, True)],
                         ids=["draft-vocab-compute_logits", "draft-vocab-get_top_tokens", "full-vocab-get_top_tokens"])
def test_coral3_greedy_is_token_identical(target_path, target_greedy, tmp_path, draft_vocab, local_argmax):
    ckpt, _ = _coral3(target_path, tmp_path, draft_vocab=draft_vocab)
    spec = validate_drafter(ckpt).speculative_config(3)
    assert spec["method"] == "eagle3"
    spec["use_local_argmax_reduction"] = local_argmax
    run = _run(target_path, spec)
    assert run.spec.num_drafts > 0, "vLLM did not speculate with the checkpoint"
    assert run.token_ids == target_greedy.token_ids


def test_all_groups_routed_is_the_dense_eagle3_drafter(target_path, tmp_path):
    ckpt, plain = _coral3(target_path, tmp_path, n=4, k=4)
    routed = _run(target_path, {**validate_drafter(ckpt).speculative_config(3), "use_local_argmax_reduction": False})
    dense = _run(target_path, validate_drafter(plain).speculative_config(3))
    assert routed.token_ids == dense.token_ids
    assert (routed.spec.num_drafts, routed.spec.accepted_per_pos) == (dense.spec.num_drafts, dense.spec.accepted_per_pos)


def test_broken_row_map_is_refused_at_load(target_path, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt, _ = _coral3(target_path, tmp_path)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["vocab_groups.row_to_token"][:2] = 0  # row 0 twice, another row missing
    save_file(tensors, str(ckpt / "model.safetensors"))
    spec = {"method": "eagle3", "model": str(ckpt), "num_speculative_tokens": 3}
    logs = engine_start_failure_logs(target_path, spec)
    assert "CheckpointError: CORAL-3 drafter" in logs and "bad group map vocab_groups.row_to_token" in logs, logs[-2000:]
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["Eagle3CoralLlamaForCausalLM"]


COMMITTED = CKPTS / "coral3"


def test_committed_coral3_greedy_is_identical_and_drafts_usefully(target_path, target_greedy):
    """The committed CORAL-3 drafter (router N=16, k=2 over an EAGLE-3 draft vocabulary)."""
    run = _run(target_path, validate_drafter(COMMITTED).speculative_config(3))
    assert run.token_ids == target_greedy.token_ids
    print(f"committed coral3: {run.spec}")
    assert run.spec.mean_acceptance_length > 1.1, run.spec


def test_committed_coral3_sampling_matches_target_distribution(target_path, tmp_path):
    """T=1, probabilistic drafting with k=1 of 16 groups (q far from p): the rejection
    sampler must receive exactly the routed proposal for the output to stay the target's."""
    import shutil

    from .stats import assert_same_distribution

    ckpt = tmp_path / "coral3-k1"
    shutil.copytree(COMMITTED, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vllm_coral"]["config"]["top_k"] = 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_same_distribution(target_path, validate_drafter(ckpt).speculative_config(3), "coral3")

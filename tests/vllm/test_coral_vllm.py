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
import subprocess
import sys
from collections import Counter

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.demo import committed_drafters  # noqa: E402
from vllm_coral.models.registry import load_drafter, validate_drafter  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402

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


def _chi2_two_sample(a: Counter, b: Counter, min_count: int = 10) -> tuple[float, int, float]:
    """Chi-square homogeneity test of two samples of tokens; rare tokens pooled. -> (stat, df, p)."""
    keys = [t for t in set(a) | set(b) if a[t] + b[t] >= min_count]
    rows = [[a[t] for t in keys], [b[t] for t in keys]]
    rows[0].append(sum(a.values()) - sum(rows[0]))
    rows[1].append(sum(b.values()) - sum(rows[1]))
    obs = torch.tensor(rows, dtype=torch.float64)
    obs = obs[:, obs.sum(0) > 0]
    expected = obs.sum(1, keepdim=True) * obs.sum(0, keepdim=True) / obs.sum()
    stat = float(((obs - expected) ** 2 / expected).sum())
    df = obs.shape[1] - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), torch.tensor(stat / 2.0)))
    return stat, df, p


def _sample(llm, prompt, n, temperature):
    from vllm import SamplingParams

    messages = [[{"role": "user", "content": prompt}]]
    # One request first, so the n samples below find the prompt's blocks in the prefix cache
    # (samples scheduled together would otherwise all prefill the prompt).
    llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False)
    params = SamplingParams(n=n, temperature=temperature, max_tokens=3, ignore_eos=True)
    out = llm.chat(messages, params, use_tqdm=False)[0]
    return [tuple(o.token_ids) for o in out.outputs]


def test_coral_sampling_matches_target_distribution(target_path, tmp_path):
    from vllm_coral.plugin.engine import engine_kwargs, open_llm
    from vllm_coral.plugin.metrics import SpecDecodeCounters

    ckpt = tmp_path / "coral-k1"
    shutil.copytree(CORAL, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vllm_coral"]["config"]["top_k"] = 1  # q far from p: one group of N
    (ckpt / "config.json").write_text(json.dumps(cfg))

    prompt, n = "Say one word that describes the weather today.", 800
    with open_llm(**engine_kwargs(target_path, dtype="float32")) as llm:
        target = _sample(llm, prompt, n, 1.0)
        colder = _sample(llm, prompt, n, 0.7)
    spec = {**validate_drafter(ckpt).speculative_config(3), "draft_sample_method": "probabilistic"}
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        before = SpecDecodeCounters.from_metrics(llm.get_metrics())
        coral = _sample(llm, prompt, n, 1.0)
        counters = SpecDecodeCounters.from_metrics(llm.get_metrics()) - before

    # drafts were made and some, not all, accepted: the rejection sampler did real work
    assert counters.num_draft_tokens > 0 and 0 < counters.num_accepted_tokens < counters.num_draft_tokens
    for pos in (1, 2):
        ref = Counter(s[pos] for s in target)
        stat, df, p = _chi2_two_sample(ref, Counter(s[pos] for s in coral))
        print(f"token {pos + 1}: coral vs target chi2={stat:.1f} df={df} p={p:.3g}")
        assert p > 1e-3, f"token {pos + 1}: CORAL's sampled distribution differs from the target's (p={p:.2g})"
        stat, df, p_ctrl = _chi2_two_sample(ref, Counter(s[pos] for s in colder))
        print(f"token {pos + 1}: T=0.7 vs T=1 control chi2={stat:.1f} df={df} p={p_ctrl:.3g}")
        assert p_ctrl < 1e-3, "the control (T=0.7 vs T=1) was not rejected: the test has no power here"


def test_broken_group_map_is_refused_at_load(target_path, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "coral-bad"
    shutil.copytree(CORAL, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["vocab_groups.row_to_token"][:2] = 0  # token 0 twice, another token missing
    save_file(tensors, str(ckpt / "model.safetensors"))
    code = f"""
from vllm_coral.plugin.engine import engine_kwargs, open_llm
if __name__ == "__main__":
    spec = {{"method": "eagle", "model": {str(ckpt)!r}, "num_speculative_tokens": 3}}
    with open_llm(**engine_kwargs({str(target_path)!r}, dtype="float32", speculative_config=spec)):
        pass
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    logs = proc.stdout + proc.stderr  # vLLM logs the worker's root cause
    assert "CheckpointError: CORAL drafter" in logs and "bad group map vocab_groups.row_to_token" in logs
    # the header-only pre-flight check cannot see tensor values; loading the tensors does
    from vllm_coral.models.checkpoint import CheckpointError

    validate_drafter(ckpt)
    with pytest.raises(CheckpointError, match="not a permutation"):
        load_drafter(ckpt)

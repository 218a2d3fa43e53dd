"""FSPAD checkpoints in real vLLM through the plugin (``"method": "eagle"``).

- A random-weight FSPAD drafter (feature sampling + PAD) is served losslessly: T=0 output
  token-identical to the target alone. Random weights prove format and plumbing, not speed.
- The committed EAGLE drafter embedded in FSPAD (fc bias 0, sampler down_proj 0 so the
  sampler is the identity, PAD's down_proj [W; W] so predict = regress = EAGLE's output)
  must draft what plain vLLM EAGLE drafts: the same accepted tokens per draft position
  (up to last-bit rounding flipping a near-tie). This checks the adapter's fc bias, sampler
  residual, 2H residual duplication and output pair in vLLM, with a drafter good enough
  for acceptance to mean something.
- The halves are wired the right way round: with junk in the predict half only, first
  draft positions are rarely accepted although regress still carries EAGLE's features.
- T=1 with probabilistic drafting: the output distribution equals the target's
  (chi-square against the target alone, with a control that must be rejected).
- A checkpoint missing a sampler tensor is refused at load with one line naming it.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

from vllm_coral.demo import committed_drafters  # noqa: E402
from vllm_coral.models.fspad import FspadConfig, FspadDrafter  # noqa: E402
from vllm_coral.models.registry import load_drafter, save_drafter, validate_drafter  # noqa: E402

from .conftest import CONVERSATIONS, MAX_TOKENS  # noqa: E402
from .refusal import engine_start_failure_logs  # noqa: E402
from .stats import assert_same_distribution  # noqa: E402

EAGLE = committed_drafters("smollm2-135m").get("eagle")
DOWN = "layers.0.mlp.down_proj.weight"


def _serve(target_path, ckpt, k: int = 3):
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    spec = validate_drafter(ckpt).speculative_config(k)  # the plugin is loaded: no VLLM_PLUGINS=none
    assert spec["method"] == "eagle"
    with open_llm(**engine_kwargs(target_path, dtype="float32", speculative_config=spec)) as llm:
        return timed_chat(llm, CONVERSATIONS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))


def _random_fspad(target_path, out):
    torch.manual_seed(0)
    model = FspadDrafter(FspadConfig.from_target(json.loads((target_path / "config.json").read_text())))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name == "fc.bias":
                p.uniform_(-0.1, 0.1)
    return save_drafter(model, out, family="fspad", recipe="fspad")


def _eagle_inside_fspad(out, *, fs: bool, pad: bool, junk_predict: bool = False):
    """FSPAD weights that compute EAGLE's output (or junk in predict only, if asked)."""
    eagle, _ = load_drafter(EAGLE)
    model = FspadDrafter(FspadConfig(eagle.config, feature_sampling=fs, pad=pad))
    state = {**model.state_dict(), **{k: v for k, v in eagle.state_dict().items() if k != DOWN}}
    W = eagle.state_dict()[DOWN]
    if pad:
        torch.manual_seed(1)
        state[DOWN] = torch.cat((torch.randn_like(W) if junk_predict else W, W))
    else:
        state[DOWN] = W
    if fs:  # the sampler's norm, gate and up stay random: only down_proj = 0 silences it
        state["fc.bias"] = torch.zeros_like(state["fc.bias"])
        state["sampler.down_proj.weight"] = torch.zeros_like(state["sampler.down_proj.weight"])
    model.load_state_dict(state)
    if not junk_predict:  # precondition, in torch: this FSPAD computes what the EAGLE drafter does
        emb, feat = torch.randn(1, 5, 576), torch.randn(1, 5, 576)
        with torch.no_grad():
            predict, regress = model(emb, feat, torch.arange(5))
            torch.testing.assert_close(predict, eagle(emb, feat, torch.arange(5)))
            torch.testing.assert_close(regress, predict)
    return save_drafter(model, out, family="fspad", recipe="fspad")


def test_random_fspad_is_served_losslessly(target_path, target_greedy, tmp_path):
    run = _serve(target_path, _random_fspad(target_path, tmp_path / "fspad-random"))
    assert run.spec.num_drafts > 0, "vLLM did not speculate with the checkpoint"
    assert run.token_ids == target_greedy.token_ids


@pytest.fixture(scope="module")
def eagle_run(target_path):
    assert EAGLE is not None, "checkpoints/smollm2-135m/eagle is missing"
    return _serve(target_path, EAGLE)


@pytest.mark.parametrize("fs, pad", [(True, True), (True, False), (False, True)])
def test_eagle_inside_fspad_drafts_what_eagle_drafts(fs, pad, target_path, target_greedy, eagle_run, tmp_path):
    run = _serve(target_path, _eagle_inside_fspad(tmp_path / "fspad-eagle", fs=fs, pad=pad))
    assert run.token_ids == target_greedy.token_ids
    print(f"eagle {eagle_run.spec}\nfspad(fs={fs}, pad={pad}) {run.spec}")
    assert eagle_run.spec.num_accepted_tokens > 0
    # Same drafts: equal counts are expected. The 2H down_proj GEMM and the biased fc may
    # round the last bit differently from EAGLE's kernels, which can flip a near-tie
    # argmax; a wiring error would move these counts by far more than 2.
    diff = sum(abs(a - b) for a, b in zip(run.spec.accepted_per_pos, eagle_run.spec.accepted_per_pos))
    assert len(run.spec.accepted_per_pos) == len(eagle_run.spec.accepted_per_pos)
    assert diff <= 2, (run.spec, eagle_run.spec)


def test_logits_come_from_predict(target_path, target_greedy, eagle_run, tmp_path):
    run = _serve(target_path, _eagle_inside_fspad(tmp_path / "fspad-junk", fs=True, pad=True, junk_predict=True))
    assert run.token_ids == target_greedy.token_ids
    print(f"eagle {eagle_run.spec}\nfspad with junk predict {run.spec}")
    assert run.spec.accepted_per_pos[0] < 0.25 * eagle_run.spec.accepted_per_pos[0]


def test_fspad_sampling_matches_target_distribution(target_path, tmp_path):
    """T=1, probabilistic drafting through the adapter (sampler, PAD split): the output
    distribution equals the target's (``stats.assert_same_distribution``)."""
    ckpt = _eagle_inside_fspad(tmp_path / "fspad-t1", fs=True, pad=True)
    assert_same_distribution(target_path, validate_drafter(ckpt).speculative_config(3), "FSPAD")


def test_missing_tensor_is_refused_at_load(target_path, tmp_path):
    ckpt = _random_fspad(target_path, tmp_path / "fspad-bad")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors.pop("sampler.up_proj.weight")
    save_file(tensors, str(ckpt / "model.safetensors"))
    spec = {"method": "eagle", "model": str(ckpt), "num_speculative_tokens": 3}
    logs = engine_start_failure_logs(target_path, spec)
    assert "CheckpointError: FSPAD drafter" in logs and "missing tensor(s) sampler.up_proj.weight" in logs

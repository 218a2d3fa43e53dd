"""FSPAD recipes through the one loop: PAD's two losses reach their own halves of the
output, the HASS-style variant reports every unrolled step, and a short run on real
SmolLM2 features improves held-out top-1 and writes a checkpoint that validates."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vllm_coral.models.registry import validate_drafter
from vllm_coral.models.target import TargetHead
from vllm_coral.training.dataset import FeatureDataset
from vllm_coral.training.evaluate import evaluate
from vllm_coral.training.loop import LoopConfig, run
from vllm_coral.training.fspad import FSPAD, FSPAD_HASS, FspadTrainConfig
from vllm_coral.training.recipes import get_recipe
from vllm_coral.training.unrolled import CSRA, TopKDistill

LOOP = LoopConfig(epochs=4, batch_tokens=512, lr=2e-3, warmup_steps=2, save_every=1000, log_every=1000)


def test_presets_and_validation():
    assert get_recipe("fspad") is FSPAD and get_recipe("fspad-hass") is FSPAD_HASS
    p = FSPAD.preset
    assert (p.unroll, p.noise_std, p.feature_weight, p.ce_weight, p.topk, p.csra) == (1, 0.2, 1.0, 0.1, None, None)
    assert p.feature_sampling and p.pad
    assert FSPAD_HASS.preset == replace(p, unroll=3, topk=TopKDistill())
    with pytest.raises(ValueError, match="needs unroll >= 2"):
        FspadTrainConfig(csra=CSRA())


@pytest.fixture(scope="module")
def head(target_path):
    return TargetHead.load(target_path)


def _batch(tiny_features, head):
    return FeatureDataset(tiny_features, 64, head.hidden_size).collate([0, 1], torch.Generator().manual_seed(0))


def _down_proj_grad(cfg, head, batch) -> torch.Tensor:
    torch.manual_seed(0)
    drafter = FSPAD.build(cfg, head, None)
    total, _ = FSPAD.loss(cfg, drafter, head, batch)
    total.backward()
    return drafter.layers[0].mlp.down_proj.weight.grad  # [2H, I]: rows [:H] predict, [H:] regress


def test_pad_losses_train_their_own_half(target_path, tiny_features, head):
    """The feature loss reads regress only (down_proj rows H:), the CE reads predict only
    (rows :H): with one weight zeroed, the other half's gradient is exactly zero."""
    batch, H = _batch(tiny_features, head), head.hidden_size
    cfg = replace(FSPAD.preset, noise_std=0.0)
    ce_only = _down_proj_grad(replace(cfg, feature_weight=0.0), head, batch)
    feat_only = _down_proj_grad(replace(cfg, ce_weight=0.0), head, batch)
    assert ce_only[:H].abs().sum() > 0 and torch.count_nonzero(ce_only[H:]) == 0
    assert feat_only[H:].abs().sum() > 0 and torch.count_nonzero(feat_only[:H]) == 0


def test_hass_variant_reports_every_step_and_is_noise_free_when_scoring(target_path, tiny_features, head):
    cfg = replace(FSPAD_HASS.preset, noise_std=5.0, csra=CSRA())
    module = FSPAD_HASS.build(cfg, head, None).train()
    with torch.no_grad():
        noisy, terms = FSPAD_HASS.loss(cfg, module, head, _batch(tiny_features, head))
        clean, _ = FSPAD_HASS.loss(cfg, module.eval(), head, _batch(tiny_features, head))
    for j in (1, 2, 3):
        assert {f"acc/top1_step{j}", f"loss/feature_step{j}", f"loss/ce_step{j}", f"loss/topk_step{j}"} <= set(terms)
    assert terms["loss/csra"] > 0 and float(noisy) != float(clean)


def test_fspad_learns_and_scores_heldout(target_path, tiny_features, tmp_path, head):
    summary = run(FSPAD, FSPAD.preset, LOOP, target_path, tiny_features, tmp_path / "run", progress=False,
                  heldout=tiny_features)  # fmt: skip
    ckpt = validate_drafter(tmp_path / "run" / "drafter", json.loads((target_path / "config.json").read_text()))
    assert (ckpt.family.name, ckpt.recipe) == ("fspad", "fspad") and ckpt.config.pad
    scores = summary["eval"]
    assert {"acc/top1_step1", "loss/feature_step1", "loss/ce_step1", "tokens"} <= set(scores)
    # an untrained drafter of the same shape: training must have moved step-1 top-1 and CE
    before = evaluate(FSPAD, FSPAD.preset, FSPAD.build(FSPAD.preset, head, None), head, tiny_features)
    assert scores["acc/top1_step1"] > before["acc/top1_step1"] + 0.2, (before, scores)
    assert scores["loss/ce_step1"] < before["loss/ce_step1"] - 1.0

"""EAGLE-3 recipe (training-time test) through the one loop, and held-out scoring: it learns
on real SmolLM2 features, writes a checkpoint that validates against the real target,
scores held-out data per drafting step without noise, and refuses features without aux
layers in one line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from vllm_coral.models.registry import load_drafter, validate_drafter
from vllm_coral.training.evaluate import evaluate
from vllm_coral.training.loop import LoopConfig, run
from vllm_coral.training.ttt import EAGLE3, EAGLE3_CSRA, TTTConfig

LOOP = LoopConfig(epochs=6, batch_tokens=512, lr=2e-3, warmup_steps=2, save_every=1000, log_every=1000)


def test_ttt_config_is_validated():
    with pytest.raises(ValueError, match="needs unroll >= 2"):
        replace(EAGLE3_CSRA.preset, unroll=1)
    with pytest.raises(ValueError, match="step_decay"):
        TTTConfig(step_decay=0.0)


def test_eagle3_learns_and_scores_heldout_per_step(target_path, tiny_features, tmp_path):
    summary = run(EAGLE3, EAGLE3.preset, LOOP, target_path, tiny_features, tmp_path / "run", progress=False,
                  heldout=tiny_features)  # fmt: skip
    ckpt = validate_drafter(tmp_path / "run" / "drafter", json.loads((target_path / "config.json").read_text()))
    assert ckpt.config.aux_layers == (2, 15, 27) and ckpt.recipe == "eagle3"
    scores = summary["eval"]
    assert set(scores) >= {"acc/top1_step1", "acc/top1_step2", "acc/top1_step3", "loss/ce_step1", "tokens"}
    history = json.loads((tmp_path / "run" / "heldout.json").read_text())["history"]
    assert history[-1]["step"] == summary["steps"] and history[-1]["acc/top1_step1"] == scores["acc/top1_step1"]
    # an untrained drafter of the same shape: training must have moved step-1 top-1 and CE
    untrained = EAGLE3.build(EAGLE3.preset, _head(target_path), _data(tiny_features))
    before = evaluate(EAGLE3, EAGLE3.preset, untrained, _head(target_path), tiny_features)
    assert scores["acc/top1_step1"] > before["acc/top1_step1"] + 0.2, (before, scores)
    assert scores["loss/ce_step1"] < before["loss/ce_step1"] - 1.0


def test_a_draft_vocabulary_is_the_most_written_tokens(target_path, tiny_features, tmp_path):
    cfg = replace(EAGLE3.preset, draft_vocab=64, unroll=2)
    loop = replace(LOOP, epochs=2)
    summary = run(EAGLE3, cfg, loop, target_path, tiny_features, tmp_path / "run", progress=False, heldout=tiny_features)
    data = _data(tiny_features)
    counts = data.token_counts(49152)
    drafter, ckpt = load_drafter(tmp_path / "run" / "drafter", json.loads((target_path / "config.json").read_text()))
    assert ckpt.config.draft_vocab_size == 64 and len(drafter.draft_ids) == 64
    assert counts[drafter.draft_ids].min() >= counts.sort(descending=True).values[63]  # the 64 most written
    assert torch.equal(drafter.draft_head, _head(target_path).lm_head[drafter.draft_ids])  # frozen target rows
    assert 0.5 < summary["eval"]["acc/draft_vocab_mass"] <= 1.0


def test_training_scores_the_draft_vocabulary_only_with_the_same_loss(target_path, tiny_features):
    # training computes the target's logits over the draft vocabulary only; its loss must be
    # the eval-mode loss (full softmax, restricted and renormalised) on the same batch
    cfg = replace(EAGLE3.preset, draft_vocab=64, unroll=2)
    module = EAGLE3.build(cfg, _head(target_path), _data(tiny_features))
    batch = _data(tiny_features).collate([0, 1], torch.Generator())
    with torch.no_grad():
        fast, fast_terms = EAGLE3.loss(cfg, module.train(), _head(target_path), batch)
        full, full_terms = EAGLE3.loss(cfg, module.eval(), _head(target_path), batch)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_terms["loss/ce_step2"], full_terms["loss/ce_step2"], rtol=1e-5, atol=1e-6)
    assert "acc/draft_vocab_mass" in full_terms and "acc/draft_vocab_mass" not in fast_terms


def test_heldout_scoring_is_noise_free_and_repeatable(target_path, tiny_features):
    cfg = replace(EAGLE3.preset, noise_std=5.0, unroll=2)
    module = EAGLE3.build(cfg, _head(target_path), _data(tiny_features)).train()
    a = evaluate(EAGLE3, cfg, module, _head(target_path), tiny_features)
    b = evaluate(EAGLE3, cfg, module, _head(target_path), tiny_features)
    assert a == b and module.training  # the mode is restored
    torch.manual_seed(1)
    with torch.no_grad():
        noisy, _ = EAGLE3.loss(cfg, module, _head(target_path), _data(tiny_features).collate([0, 1], torch.Generator()))
        clean, _ = EAGLE3.loss(cfg, module.eval(), _head(target_path), _data(tiny_features).collate([0, 1], torch.Generator()))
    assert float(noisy) != float(clean)


def test_features_without_aux_layers_are_refused_in_one_line(target_path, tmp_path):
    from vllm_coral.training.features import extract_features

    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hello there, friend."}]}) + "\n")  # fmt: skip
    extract_features(target_path, src, tmp_path / "plain", dtype="float32")
    with pytest.raises(ValueError, match="no aux-layer features; extract them with `data features --aux-layers"):
        run(EAGLE3, EAGLE3.preset, LOOP, target_path, tmp_path / "plain", tmp_path / "run", progress=False)


def _head(target_path):
    from vllm_coral.models.target import TargetHead

    return TargetHead.load(target_path)


def _data(features):
    from vllm_coral.training.dataset import FeatureDataset

    return FeatureDataset(features, 1024, 576, aux=True)

"""Logit losses over the most written tokens (``loss_vocab``, a training-speed option): the
sub-vocabulary is the target's most frequent output tokens, training uses only those rows
of the head, and held-out scoring (eval mode) still uses the full head."""

from __future__ import annotations

from dataclasses import replace

import torch

from vllm_coral.models.target import TargetHead
from vllm_coral.training.dataset import FeatureDataset
from vllm_coral.training.unrolled import EAGLE, HASS


def _setup(target_path, features, cfg):
    head = TargetHead.load(target_path)
    data = FeatureDataset(features, 1024, 576)
    torch.manual_seed(0)
    drafter = EAGLE.build(cfg, head, data)
    return head, data, drafter, data.collate([0, 1, 2], torch.Generator().manual_seed(0))


def test_most_written_are_the_most_frequent_assistant_tokens(tiny_features):
    data = FeatureDataset(tiny_features, 1024, 576)
    counts = data.token_counts(49152)
    ids = data.most_written(49152, 20)
    assert ids.tolist() == sorted(ids.tolist()) and ids.unique().numel() == 20
    assert counts[ids].min() >= counts.sort(descending=True).values[19]
    written = torch.cat([x[m > 0] for x, m in zip(data._ids, data._mask)])
    assert counts.sum() == written.numel()


def test_full_loss_vocab_equals_the_full_head(target_path, tiny_features):
    cfg = replace(HASS.preset, noise_std=0.0, loss_vocab=49152)
    head, _, drafter, batch = _setup(target_path, tiny_features, cfg)
    with torch.no_grad():
        restricted, _ = HASS.loss(cfg, drafter.train(), head, batch)
        full, _ = HASS.loss(replace(cfg, loss_vocab=None), drafter.eval(), head, batch)
    torch.testing.assert_close(restricted, full, rtol=1e-5, atol=1e-5)


def test_a_small_loss_vocab_is_used_in_training_only(target_path, tiny_features):
    cfg = replace(EAGLE.preset, noise_std=0.0, loss_vocab=64)
    head, data, drafter, batch = _setup(target_path, tiny_features, cfg)
    assert torch.equal(drafter.loss_vocab, data.most_written(49152, 64))
    assert "loss_vocab" not in drafter.state_dict()  # a training choice, not part of the checkpoint
    plain = replace(cfg, loss_vocab=None)
    with torch.no_grad():
        train, _ = EAGLE.loss(cfg, drafter.train(), head, batch)
        by_hand, _ = EAGLE.loss(plain, drafter.train(), head.rows(drafter.loss_vocab), batch)
        held, _ = EAGLE.loss(cfg, drafter.eval(), head, batch)
        full, _ = EAGLE.loss(plain, drafter.eval(), head, batch)
    torch.testing.assert_close(train, by_hand)
    torch.testing.assert_close(held, full)
    assert not torch.allclose(train, full)

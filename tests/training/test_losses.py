"""Loss functions against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_coral.training.losses import (
    csra_loss,
    feature_loss,
    masked_mean,
    soft_ce_loss,
    target_distribution,
    top1_accuracy,
    topk_distill_loss,
)


def test_feature_loss_smooth_l1():
    # |d| = 0.5 -> 0.5 * 0.5^2 = 0.125; |d| = 2 -> 2 - 0.5 = 1.5; mean over H = 0.8125
    h = torch.tensor([[0.0, 0.0], [9.0, 9.0]])
    f = torch.tensor([[0.5, 2.0], [0.0, 0.0]])
    assert feature_loss(h, f, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.8125)


def test_soft_ce():
    # p = [0.5, 0.5]; q = softmax([ln 3, 0]) = [0.75, 0.25]; CE = -(0.5 ln 0.75 + 0.5 ln 0.25)
    want = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    log_q = torch.tensor([[math.log(3), 0.0]]).log_softmax(-1)
    got = soft_ce_loss(log_q, target_distribution(torch.tensor([[0.0, 0.0]])), torch.ones(1))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_topk_distill():
    # target logits [1, 0, -9]: p0 = e/(e+1+e^-9); K=1 keeps only token 0: -p0 ln q0, q0 = 0.75
    p = torch.tensor([1.0, 0.0, -9.0]).softmax(-1)
    log_q = torch.tensor([[math.log(3), 0.0, -1e9]]).log_softmax(-1)
    target = torch.tensor([[1.0, 0.0, -9.0]])
    got = topk_distill_loss(log_q, target_distribution(target, k=1), torch.ones(1))
    assert got.item() == pytest.approx(-p[0].item() * math.log(0.75), rel=1e-6)
    # K = V is the full soft CE
    full = topk_distill_loss(log_q, target_distribution(target, k=2), torch.ones(1))
    want = -(p[0] * math.log(0.75) + p[1] * math.log(0.25)).item()
    assert full.item() == pytest.approx(want, rel=1e-5)


def test_masking_and_accuracy():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])).item() == 2.0
    assert masked_mean(torch.tensor([5.0]), torch.tensor([0])).item() == 0.0
    d = torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[3.0, 1.0], [5.0, 1.0], [0.0, 1.0]])
    assert top1_accuracy(d.log_softmax(-1), target_distribution(t), torch.tensor([1.0, 1.0, 0.0])).item() == 0.5
    # rows selected from a shared distribution are the rows' own distribution
    dist = target_distribution(t, k=1)
    assert torch.equal(dist.select(torch.tensor([2, 0])).top1, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="k > 0"):
        topk_distill_loss(d.log_softmax(-1), target_distribution(t), torch.ones(3))


def test_csra_loss_hand_computed():
    """Two steps, two positions, tau = 0.5, already unit-norm features:
    z1 = [[1, 0], [0, 1]], z2 = [[0.6, 0.8], [0, 1]].
    z1 z2^T / tau = [[1.2, 0], [1.6, 2]]  -> L_12 = (log(1 + e^-1.2) + log(1 + e^-0.4)) / 2
    z2 z1^T / tau = [[1.2, 1.6], [0, 2]]  -> L_21 = (log(1 + e^0.4) + log(1 + e^-2)) / 2
    loss = (L_12 + L_21) / 2 = 0.454060..."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    l12 = (math.log1p(math.exp(-1.2)) + math.log1p(math.exp(-0.4))) / 2
    l21 = (math.log1p(math.exp(0.4)) + math.log1p(math.exp(-2.0))) / 2
    got = csra_loss([z1, z2], temperature=0.5)
    assert got.item() == pytest.approx((l12 + l21) / 2, rel=1e-6)
    assert (l12 + l21) / 2 == pytest.approx(0.454060, abs=1e-6)


def test_csra_loss_is_scale_invariant_and_rewards_alignment():
    torch.manual_seed(0)
    steps = [torch.randn(16, 8) for _ in range(3)]
    base = csra_loss(steps, temperature=0.1)
    scaled = [h * torch.rand(16, 1).add(0.1) * 50 for h in steps]  # any positive scale per row
    assert csra_loss(scaled, temperature=0.1).item() == pytest.approx(base.item(), rel=1e-5)
    # aligning the later steps with step 1 lowers the loss
    aligned = [steps[0], steps[0] + 0.01 * steps[1], steps[0] + 0.01 * steps[2]]
    assert csra_loss(aligned, temperature=0.1) < base


def test_csra_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        csra_loss([torch.randn(4, 3)])
    with pytest.raises(ValueError, match="temperature"):
        csra_loss([torch.randn(4, 3)] * 2, temperature=0.0)

"""Drafter losses (EAGLE, HASS), each a small pure function with a hand-checked test.

Notation: h [N, H] drafter output features, f [N, H] the target's next features, W [V, H]
the target's LM head, p = softmax(W f) the target's next-token distribution (a
``TargetDist``, computed once per batch), q = softmax(W h) the drafter's, passed as
log q (computed once per step and shared by the terms), mask [N] 1 where the position
counts. All of it in float32, whatever the autocast dtype of the matmuls.

- ``feature_loss``: SmoothL1(h, f) (beta 1, mean over H), averaged over masked positions.
  (EAGLE: regression on features is easier than on tokens and carries more signal.)
- ``soft_ce_loss``: -sum_v p(v) log q(v), averaged over masked positions; EAGLE weights it
  0.1 beside the feature loss.
- ``topk_distill_loss``: HASS's harmonized objective distillation,
  -sum_{v in TopK(p)} p(v) log q(v) with K=10: the CE restricted to the target's top-K
  tokens, which focuses the drafter on the tokens that decide acceptance.
- ``top1_accuracy``: how often argmax q == argmax p on masked positions (logged per step).
- ``csra_loss``: CORAL's Cross-Step Representation Alignment. In n-step unrolled training
  the drafter predicts the feature of the same position P times from different inputs
  (step 1 from target features, step j from its own step-(j-1) outputs). With
  z_j = h_j / |h_j| for the M positions scored by every step, for each ordered pair of
  steps (i, j), i != j, an InfoNCE over positions::

      L_ij = mean_p -log( exp(z_i[p].z_j[p] / tau) / sum_p' exp(z_i[p].z_j[p'] / tau) )

  i.e. the same position at another step is the positive and the other positions of that
  step are the negatives; the loss is the mean of L_ij over the n(n-1) ordered pairs.
  Cosine similarity makes it invariant to the scale of the features. Negatives are taken
  from the other step only (not from the anchor's own step): METHODS.md names
  "same position across steps" as positives and "other positions" as negatives, and the
  cross-step form is the one that pulls the later, noisier steps towards step 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["TargetDist", "csra_loss", "feature_loss", "masked_mean", "soft_ce_loss", "target_distribution",
           "top1_accuracy", "topk_distill_loss"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [N] over ``mask`` [N] (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def feature_loss(h: torch.Tensor, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_pos = F.smooth_l1_loss(h.float(), f.float(), reduction="none", beta=1.0).mean(-1)
    return masked_mean(per_pos, mask)


@dataclass(frozen=True)
class TargetDist:
    """The target's next-token distribution at the scored positions, computed once per batch
    and shared by every loss term and unrolled step (softmax and top-K over 49152 columns
    are a quarter of a step; recomputing them per term and step doubled that)."""

    # [n, V] p = softmax(W f), float32.
    probs: torch.Tensor
    # [n] argmax p.
    top1: torch.Tensor
    # [n, K] the K largest p and their token ids (K = 0: not computed).
    topk_p: torch.Tensor
    topk_idx: torch.Tensor

    def select(self, rows: torch.Tensor) -> TargetDist:
        """The distribution at a subset of the positions (bool mask or indices)."""
        return TargetDist(self.probs[rows], self.top1[rows], self.topk_p[rows], self.topk_idx[rows])

    def restrict(self, ids: torch.Tensor) -> tuple[TargetDist, torch.Tensor]:
        """(p over the sub-vocabulary ``ids`` [Vd], renormalised, in its column order; the
        mass [n] p had there). ``top1`` becomes the column of the target's top token, or -1
        where that token is outside ``ids`` (no drafter prediction can match it there)."""
        sub = self.probs[:, ids]  # [n, Vd], gathered once
        mass = sub.sum(-1)
        probs = sub / mass.clamp_min(1e-12)[:, None]
        column = torch.full((self.probs.shape[-1],), -1, dtype=torch.long, device=ids.device)
        column[ids] = torch.arange(len(ids), device=ids.device)
        return TargetDist(probs, column[self.top1], self.topk_p[:, :0], self.topk_idx[:, :0]), mass


def target_distribution(target_logits: torch.Tensor, k: int = 0) -> TargetDist:
    """[n, V] target logits -> TargetDist (with the top-k when k > 0)."""
    probs = target_logits.float().softmax(-1)
    top_p, top_idx = probs.topk(k, dim=-1) if k > 0 else (probs[:, :0], probs[:, :0].long())
    return TargetDist(probs, probs.argmax(-1), top_p, top_idx)


def soft_ce_loss(log_q: torch.Tensor, target: TargetDist, mask: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log q(v); ``log_q`` [n, V] = log_softmax of the drafter's logits."""
    return masked_mean(-(target.probs * log_q).sum(-1), mask)


def topk_distill_loss(log_q: torch.Tensor, target: TargetDist, mask: torch.Tensor) -> torch.Tensor:
    """-sum_{v in TopK(p)} p(v) log q(v), K = the top-k the TargetDist was built with."""
    if target.topk_idx.shape[-1] == 0:
        raise ValueError("topk_distill_loss needs a TargetDist built with k > 0")
    return masked_mean(-(target.topk_p * log_q.gather(-1, target.topk_idx)).sum(-1), mask)


def top1_accuracy(log_q: torch.Tensor, target: TargetDist, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean((log_q.argmax(-1) == target.top1).float(), mask)


def csra_loss(step_features: list[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE across unroll steps; ``step_features`` holds one [M, H] per step, rows aligned."""
    if len(step_features) < 2:
        raise ValueError("csra_loss needs the features of at least two unrolled steps")
    if temperature <= 0:
        raise ValueError(f"csra temperature must be positive, got {temperature}")
    z = [F.normalize(h.float(), dim=-1) for h in step_features]
    m = z[0].shape[0]
    if m == 0:
        return z[0].new_zeros(())
    labels = torch.arange(m, device=z[0].device)
    total = z[0].new_zeros(())
    pairs = 0
    for i, zi in enumerate(z):
        for j, zj in enumerate(z):
            if i != j:
                total = total + F.cross_entropy(zi @ zj.T / temperature, labels)
                pairs += 1
    return total / pairs

"""Drafter losses (EAGLE, HASS), each a small pure function with a hand-checked test.

Notation: h [N, H] drafter output features, f [N, H] the target's next features, W [V, H]
the target's LM head, p = softmax(W f) the target's next-token distribution, q = softmax(W h)
the drafter's, mask [N] 1 where the position counts.

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

import torch
import torch.nn.functional as F

__all__ = ["csra_loss", "feature_loss", "masked_mean", "soft_ce_loss", "top1_accuracy", "topk_distill_loss"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [N] over ``mask`` [N] (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def feature_loss(h: torch.Tensor, f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    per_pos = F.smooth_l1_loss(h.float(), f.float(), reduction="none", beta=1.0).mean(-1)
    return masked_mean(per_pos, mask)


def soft_ce_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    p = target_logits.float().softmax(-1)
    log_q = draft_logits.float().log_softmax(-1)
    return masked_mean(-(p * log_q).sum(-1), mask)


def topk_distill_loss(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor, k: int = 10
) -> torch.Tensor:
    p = target_logits.float().softmax(-1)
    top_p, top_idx = p.topk(k, dim=-1)
    log_q = draft_logits.float().log_softmax(-1).gather(-1, top_idx)
    return masked_mean(-(top_p * log_q).sum(-1), mask)


def top1_accuracy(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    hits = (draft_logits.argmax(-1) == target_logits.argmax(-1)).float()
    return masked_mean(hits, mask)


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

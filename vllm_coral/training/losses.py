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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["feature_loss", "masked_mean", "soft_ce_loss", "top1_accuracy", "topk_distill_loss"]


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

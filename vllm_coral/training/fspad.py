"""FSPAD's recipes: partial alignment distillation, single-step (the paper) or HASS-unrolled.

At index t the drafter (``vllm_coral.models.fspad``) reads E[x_{t+1}] and the target
feature f_t (+ uniform noise (U(0,1) - 0.5) * noise_std while training, as EAGLE) and
returns predict_t and regress_t [B, S, H]. PAD trains the two halves on different targets
(``eagle/train/main_fspad.py``: ``v_w`` 1.0, ``p_w`` 0.1)::

    loss = feature_weight * SmoothL1(regress_t, f_{t+1})
         + ce_weight * -sum_v p(v) log q(v),   p = softmax(W f_{t+1}), q = softmax(W predict_t)

so the head-facing half is free to move away from the target's feature space, and only
the half fed back to the next drafting step is held to it.

``unroll=1`` is the paper's single-step training. ``unroll > 1`` is ours to try: HASS's
harmonized context alignment as in ``vllm_coral.training.unrolled`` (step j >= 2 reads,
at index t, the detached step-(j-1) **regress** output of index t-1, exactly what drafting
step j feeds back at inference; attention reads the keys of ``hass_attention_mask``;
indices t < j-1 are left out of step j's loss; the loss is averaged over steps), with
HASS's top-K distillation on the predict logits and, optionally, CORAL's CSRA on the
regress outputs (the half that lives in feature space and is fed back).

The loss is ``vllm_coral.training.unrolled.unrolled_loss`` itself (its steps yield
(predict, regress); for EAGLE both are the one output), so every option of the EAGLE
recipes (top-K, CSRA, ``loss_vocab``) applies unchanged and terms are reported under the
same keys (``acc/top1_step{j}``, ``loss/feature_step{j}``, ``loss/ce_step{j}``).

Differences from the authors' recipe: their uniform noise is scaled by 512 / sequence
length (EAGLE's code); ours is EAGLE's as the other recipes here apply it. Their loss
averages over a padded batch with a +1e-5 in the denominator; ours over scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vllm_coral.models.fspad import FspadConfig, FspadDrafter
from vllm_coral.training.recipes import Recipe, knob
from vllm_coral.training.unrolled import (
    TopKDistill,
    UnrolledConfig,
    attach_loss_vocab,
    exporter,
    unrolled_loss,
    warm_start,
)

__all__ = ["FSPAD", "FSPAD_HASS", "FspadTrainConfig"]


@dataclass(frozen=True)
class FspadTrainConfig(UnrolledConfig):
    # Model switch: FspadConfig.feature_sampling.
    feature_sampling: bool = knob(True, "feature sampling after fc (off: EAGLE's plain fc)")
    # Model switch: FspadConfig.pad.
    pad: bool = knob(True, "partial alignment distillation: 2H output [predict | regress] (off: one output)")


def _build(cfg: FspadTrainConfig, head, data) -> FspadDrafter:
    drafter = FspadDrafter(FspadConfig.from_target(head.config, feature_sampling=cfg.feature_sampling, pad=cfg.pad))
    return attach_loss_vocab(warm_start(drafter, cfg, head, "fspad"), cfg, head, data)


FSPAD = Recipe(name="fspad", family="fspad", preset=FspadTrainConfig(), build=_build, loss=unrolled_loss,
               export=exporter("fspad", family="fspad"),
               help="FSPAD: feature sampling + partial alignment distillation, one step (the paper)")  # fmt: skip
FSPAD_HASS = replace(FSPAD, name="fspad-hass", preset=replace(FSPAD.preset, unroll=3, topk=TopKDistill()),
                     export=exporter("fspad-hass", family="fspad"),
                     help="FSPAD + HASS: 3 unrolled steps feeding regress back, + top-10 distillation")  # fmt: skip

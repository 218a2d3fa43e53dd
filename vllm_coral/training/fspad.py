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

Terms are reported per step under the keys of ``unrolled`` (``acc/top1_step{j}``,
``loss/feature_step{j}``, ``loss/ce_step{j}``, ``loss/topk_step{j}``), so held-out scoring
(``vllm_coral.training.evaluate``) reads them the same way.

Differences from the authors' recipe: their uniform noise is scaled by 512 / sequence
length (EAGLE's code); ours is EAGLE's as the other recipes here apply it. Their loss
averages over a padded batch with a +1e-5 in the denominator; ours over scored tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vllm_coral.models.fspad import FspadConfig, FspadDrafter
from vllm_coral.models.registry import save_drafter
from vllm_coral.training.losses import (
    TargetDist,
    csra_loss,
    feature_loss,
    soft_ce_loss,
    target_distribution,
    top1_accuracy,
    topk_distill_loss,
)
from vllm_coral.training.recipes import Recipe, knob
from vllm_coral.training.unrolled import CSRA, TopKDistill, hass_attention_mask, next_token_weight

__all__ = ["FSPAD", "FSPAD_HASS", "FspadTrainConfig", "fspad_steps"]


@dataclass(frozen=True)
class FspadTrainConfig:
    # Drafting steps trained per position; the paper trains one.
    unroll: int = knob(1, "drafting steps unrolled per position (FSPAD 1; >1: HASS-style, feeding regress back)")
    # EAGLE's input-feature noise (the authors' std 0.2, uniform).
    noise_std: float = knob(0.2, "input-feature noise width: (U(0,1) - 0.5) * noise_std")
    # The authors' v_w.
    feature_weight: float = knob(1.0, "weight of SmoothL1(regress, f_next)")
    # The authors' p_w.
    ce_weight: float = knob(0.1, "weight of the soft cross-entropy on head(predict)")
    # HASS's top-K distillation on the predict logits.
    topk: TopKDistill | None = knob(None, "HASS top-K distillation on head(predict) (--no-topk: off)")
    # CORAL's cross-step alignment of the regress outputs.
    csra: CSRA | None = knob(None, "CORAL cross-step alignment on regress (--no-csra: off)")
    # Model switch: FspadConfig.feature_sampling.
    feature_sampling: bool = knob(True, "feature sampling after fc (off: EAGLE's plain fc)")
    # Model switch: FspadConfig.pad.
    pad: bool = knob(True, "partial alignment distillation: 2H output [predict | regress] (off: one output)")

    def __post_init__(self) -> None:
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.csra is not None and self.unroll < 2:
            raise ValueError("CSRA aligns unrolled steps: it needs unroll >= 2")


def fspad_steps(drafter: FspadDrafter, emb: torch.Tensor, f_in: torch.Tensor, positions: torch.Tensor,
                unroll: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Yield (j, predict_j, regress_j), each [B, S, H], for j = 1..unroll, HASS-style.

    emb [B, S, H] = E[x_{t+1}], f_in [B, S, H] = target features (+ noise). Step j >= 2
    reads the detached step-(j-1) regress of index t-1 as its feature at index t (the
    ``unrolled_steps`` schedule, with the output fed back being regress, not predict).
    """
    S = emb.shape[1]
    kv_inputs: list[torch.Tensor] = []
    regress = None
    for j in range(1, unroll + 1):
        own = f_in if j == 1 else torch.cat([f_in[:, :1], regress[:, :-1].detach()], dim=1)
        x = drafter.layer_input(emb, own)
        kv_inputs.append(x)
        if j == 1:
            predict, regress = drafter.run_layer(x, positions)
        else:
            attn = hass_attention_mask(S, j, emb.device)[None, None]
            predict, regress = drafter.run_layer(x, positions, attn, kv_inputs)
        yield j, predict, regress


def _build(cfg: FspadTrainConfig, head, data) -> FspadDrafter:
    return FspadDrafter(FspadConfig.from_target(head.config, feature_sampling=cfg.feature_sampling, pad=cfg.pad))


def _loss(cfg: FspadTrainConfig, drafter: FspadDrafter, head, batch):
    """All loss terms of one batch; returns (total, {name: value})."""
    ids, feats = batch.ids, batch.feats
    S = ids.shape[1] - 1  # index t in [0, S): inputs (x_{t+1}, f_t), target f_{t+1}
    f_in, f_next = feats[:, :-1], feats[:, 1:]
    if drafter.training:  # no noise when scoring held-out data
        noise = (torch.rand(ids.shape[0], S, feats.shape[-1], generator=batch.generator) - 0.5) * cfg.noise_std
        f_in = f_in + noise.to(feats.device)
    emb = head.embed_ids(ids[:, 1:])  # [B, S, H]
    keep = next_token_weight(batch.mask) > 0
    with torch.no_grad():
        target = target_distribution(head.logits(f_next[keep]), cfg.topk.k if cfg.topk else 0)
    common = keep.clone()
    common[:, : cfg.unroll - 1] = False  # indices every unrolled step scores
    terms: dict[str, float] = {}
    total, csra_rows = 0.0, []
    for j, predict, regress in fspad_steps(drafter, emb, f_in, torch.arange(S, device=ids.device), cfg.unroll):
        sel = keep.clone()
        sel[:, : j - 1] = False
        step_total, step_terms = _step_terms(cfg, head, predict[sel], regress[sel], f_next[sel],
                                             target.select(sel[keep]))  # fmt: skip
        terms.update({f"{name}_step{j}": v for name, v in step_terms.items()})
        total = total + step_total / cfg.unroll
        csra_rows.append(regress[common])
    if cfg.csra is not None:
        l_csra = csra_loss(csra_rows, cfg.csra.temperature)
        total = total + cfg.csra.weight * l_csra
        terms["loss/csra"] = l_csra.item()
    return total, {"loss/total": total.item(), **terms}


def _step_terms(cfg: FspadTrainConfig, head, predict: torch.Tensor, regress: torch.Tensor, f_next: torch.Tensor,
                target: TargetDist) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """One step's loss on its n scored rows: predict, regress, f_next [n, H]."""
    log_q = head.logits(predict).float().log_softmax(-1)  # cast once: every term reads it
    ones = torch.ones(log_q.shape[0], device=log_q.device)
    l_feat = feature_loss(regress, f_next, ones)
    l_ce = soft_ce_loss(log_q, target, ones)
    total = cfg.feature_weight * l_feat + cfg.ce_weight * l_ce
    terms = {"acc/top1": top1_accuracy(log_q, target, ones).item(), "loss/feature": l_feat.item(),
             "loss/ce": l_ce.item()}  # fmt: skip
    if cfg.topk is not None:
        l_topk = topk_distill_loss(log_q, target, ones)
        total = total + cfg.topk.weight * l_topk
        terms["loss/topk"] = l_topk.item()
    return total, terms


def _exporter(name: str):
    def export(cfg, drafter: FspadDrafter, head, out: Path, training: dict) -> list[Path]:
        return [save_drafter(drafter, out / "drafter", family="fspad", recipe=name, training=training)]

    return export


FSPAD = Recipe(name="fspad", family="fspad", preset=FspadTrainConfig(), build=_build, loss=_loss,
               export=_exporter("fspad"),
               help="FSPAD: feature sampling + partial alignment distillation, one step (the paper)")  # fmt: skip
FSPAD_HASS = replace(FSPAD, name="fspad-hass", preset=replace(FSPAD.preset, unroll=3, topk=TopKDistill()),
                     export=_exporter("fspad-hass"),
                     help="FSPAD + HASS: 3 unrolled steps feeding regress back, + top-10 distillation")  # fmt: skip

"""EAGLE-3's recipe: fused target features in, tokens out, trained on its own drafts
("training-time test").

Step 1 at index t reads E[x_{t+1}] and g_t = fc(aux_t), the target's low/mid/high
residual streams fused; step j >= 2 reads, at index t, the step-(j-1) pre-norm output of
index t-1, exactly what drafting step j sees in vLLM. Attention sees the context as at
inference: key s of query t comes from step ``max(1, j - (t - s))`` (the verified prefix
from step 1, the j-1 most recent positions from the drafts that produced them), the mask
of ``vllm_coral.training.unrolled.hass_attention_mask``.

Every step is scored on the token the target would write: loss_j = -sum_v p(v) log q_j(v)
with p = softmax(W f_{t+1}) the target's next-token distribution and q_j the drafter's,
at the indices t >= j-1 whose predicted token x_{t+2} is assistant-written. There is no
feature regression: the drafter's output lives in its own space (its own final norm), so
regressing it onto f_{t+1} is the constraint EAGLE-3 removed to let drafters scale with
data. Steps are weighted ``step_decay**(j-1)`` (EAGLE-3's 0.8), normalised to sum to 1.

Ours to decide (EAGLE-3's text is silent or its code differs across releases):
- ``detach``: whether step j's input carries gradients back into step j-1. Off by
  default (gradients flow), so earlier steps learn to produce inputs later steps can use.
- ``noise_std``: uniform noise on g (EAGLE-1's trick); 0 by default as in EAGLE-3.
- ``csra``: CORAL's cross-step alignment on the pre-norm outputs of every step, the
  product recipe (tier b) when on.
- ``draft_vocab``: EAGLE-3's reduced vocabulary: the Vd tokens the target writes most
  often in the training features (ties by id). p is restricted to them and renormalised;
  top-1 still counts a miss wherever the target's top token is outside them, and
  ``acc/draft_vocab_mass`` reports the target probability mass the drafter can reach.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vllm_coral.models.eagle3 import Eagle3Config, Eagle3Drafter
from vllm_coral.models.registry import save_drafter
from vllm_coral.training.losses import csra_loss, soft_ce_loss, target_distribution, top1_accuracy
from vllm_coral.training.recipes import Recipe, knob
from vllm_coral.training.unrolled import CSRA, hass_attention_mask, next_token_weight

__all__ = ["EAGLE3", "TTTConfig", "ttt_steps"]


@dataclass(frozen=True)
class TTTConfig:
    unroll: int = knob(3, "drafting steps trained per position (training-time test; EAGLE-3 uses 7)")
    step_decay: float = knob(0.8, "step j weighs step_decay**(j-1) (normalised)")
    layers: int = knob(1, "decoder layers of the drafter")
    detach: bool = knob(False, "stop gradients between unrolled steps (HASS does; EAGLE-3 does not)")
    noise_std: float = knob(0.0, "uniform noise width on the fused input feature, (U(0,1) - 0.5) * noise_std")
    draft_vocab: int | None = knob(None, "score only the N tokens the target writes most often (none: all)")
    csra: CSRA | None = knob(None, "CORAL cross-step alignment on the pre-norm outputs (--no-csra: off)")

    def __post_init__(self) -> None:
        if self.unroll < 1 or self.layers < 1:
            raise ValueError(f"unroll and layers must be >= 1, got {self.unroll} and {self.layers}")
        if not 0 < self.step_decay <= 1:
            raise ValueError(f"step_decay must be in (0, 1], got {self.step_decay}")
        if self.csra is not None and self.unroll < 2:
            raise ValueError("CSRA aligns unrolled steps: it needs unroll >= 2")


def ttt_steps(drafter: Eagle3Drafter, emb: torch.Tensor, g: torch.Tensor, unroll: int, detach: bool):
    """Yield (j, normed_j, prenorm_j), each [B, S, H], for j = 1..unroll (module docstring)."""
    S = emb.shape[1]
    positions = torch.arange(S, device=emb.device)
    cache: list[list[torch.Tensor]] = [[] for _ in drafter.layers]
    hidden = g
    for j in range(1, unroll + 1):
        mask = None if j == 1 else hass_attention_mask(S, j, emb.device)[None, None]
        normed, prenorm = drafter(emb, hidden, positions, mask, cache)
        yield j, normed, prenorm
        prev = prenorm.detach() if detach else prenorm
        hidden = torch.cat([g[:, :1], prev[:, :-1]], dim=1)  # index t reads step j's output of t-1


def _build(cfg: TTTConfig, head, data) -> Eagle3Drafter:
    config = Eagle3Config.from_target(head.config, aux_layers=data.aux_layers, num_hidden_layers=cfg.layers,
                                      draft_vocab_size=cfg.draft_vocab)  # fmt: skip
    drafter = Eagle3Drafter(config)
    if cfg.draft_vocab:
        drafter.set_draft_vocab(data.most_written(head.vocab_size, cfg.draft_vocab), head.lm_head)
    return drafter


def _loss(cfg: TTTConfig, drafter: Eagle3Drafter, head, batch):
    """All loss terms of one batch; returns (total, {name: value})."""
    ids = batch.ids
    S = ids.shape[1] - 1  # index t in [0, S): inputs (x_{t+1}, aux_t), target p(. | f_{t+1})
    g = drafter.combine(batch.aux[:, :-1])
    if drafter.training and cfg.noise_std > 0:
        noise = (torch.rand(g.shape, generator=batch.generator) - 0.5) * cfg.noise_std
        g = g + noise.to(g.device, g.dtype)
    emb = head.embed_ids(ids[:, 1:])
    keep = next_token_weight(batch.mask) > 0
    terms: dict[str, float] = {}
    with torch.no_grad():
        target = _target(cfg, drafter, head, batch.feats[:, 1:][keep], terms)
    weights = [cfg.step_decay ** (j - 1) for j in range(1, cfg.unroll + 1)]
    common = keep.clone()
    common[:, : cfg.unroll - 1] = False  # indices every step scores (for CSRA)
    total, rows = 0.0, []
    for j, normed, prenorm in ttt_steps(drafter, emb, g, cfg.unroll, cfg.detach):
        sel = keep.clone()
        sel[:, : j - 1] = False
        log_q = drafter.logits(normed[sel], head).float().log_softmax(-1)
        ones = torch.ones(log_q.shape[0], device=log_q.device)
        step_target = target.select(sel[keep])
        l_ce = soft_ce_loss(log_q, step_target, ones)
        total = total + weights[j - 1] / sum(weights) * l_ce
        terms[f"acc/top1_step{j}"] = top1_accuracy(log_q, step_target, ones).item()
        terms[f"loss/ce_step{j}"] = l_ce.item()
        rows.append(prenorm[common])
    if cfg.csra is not None:
        l_csra = csra_loss(rows, cfg.csra.temperature)
        total = total + cfg.csra.weight * l_csra
        terms["loss/csra"] = l_csra.item()
    return total, {"loss/total": total.item(), **terms}


def _target(cfg: TTTConfig, drafter: Eagle3Drafter, head, f_next: torch.Tensor, terms: dict):
    """The target's distribution at the scored rows. With a draft vocabulary, training
    computes only its Vd logits: softmax over them is exactly p restricted and renormalised,
    the loss's target, at a sixth of the full head's cost (plus the 49152-wide softmax,
    argmax and gather it skips); top-1 is then counted within the draft vocabulary. Scoring
    (eval mode) keeps the full head: misses outside the draft vocabulary, and the mass."""
    if not cfg.draft_vocab:
        return target_distribution(head.logits(f_next))
    if drafter.training:
        return target_distribution(head.rows(drafter.draft_ids).logits(f_next))
    target, mass = target_distribution(head.logits(f_next)).restrict(drafter.draft_ids)
    terms["acc/draft_vocab_mass"] = mass.mean().item()
    return target


def _exporter(name: str):
    def export(cfg, drafter: Eagle3Drafter, head, out: Path, training: dict) -> list[Path]:
        return [save_drafter(drafter, out / "drafter", family="eagle3", recipe=name, training=training)]

    return export


EAGLE3 = Recipe(name="eagle3", family="eagle3", preset=TTTConfig(), build=_build, loss=_loss,
                export=_exporter("eagle3"), aux_features=True,
                help="EAGLE-3: fused low/mid/high target features, token loss over 3 training-time-test steps")  # fmt: skip
EAGLE3_CSRA = replace(EAGLE3, name="eagle3-csra", preset=replace(EAGLE3.preset, csra=CSRA()),
                      export=_exporter("eagle3-csra"), help="EAGLE-3 + CORAL's cross-step representation alignment")  # fmt: skip

"""EAGLE-style drafters trained with unrolled drafting steps: the EAGLE, HASS and CORAL recipes.

EAGLE (``unroll=1``): at index t the drafter reads E[x_{t+1}] and the target feature f_t
(+ uniform noise, (U(0,1) - 0.5) * noise_std as in the EAGLE code) and predicts f_{t+1}:
loss = feature_weight * SmoothL1(h, f_{t+1}) + ce_weight * CE(softmax(W f_{t+1}), softmax(W h)).

HASS (``unroll=3``, harmonized context alignment + ``topk`` distillation): step j >= 2
feeds the drafter's own step-(j-1) output of index t-1 (detached) as the input feature at
index t, exactly what drafting step j sees at inference. Its attention must see the
context as inference does too: key s of query t comes from step ``max(1, j - (t - s))``:
the verified prefix (s <= t-j+1) from target features (step 1) and the j-1 most recent
positions from the draft steps that produced them. Worked example j=2, S=3: t=0 -> key 0
from step 2; t=1 -> key 0 from step 1, key 1 from step 2; t=2 -> keys 0, 1 from step 1,
key 2 from step 2. Indices t < j-1 have no step-(j-1) output to read and are left out of
step j's loss. The loss is averaged over steps.

CORAL (HASS + ``csra``, ``vllm_coral.training.losses.csra_loss``): an InfoNCE that aligns
the drafter's outputs for the same index across the unrolled steps, over the indices
every step scores (t >= unroll-1, assistant tokens). CORAL's router is trained afterwards
with the drafter frozen (``vllm_coral.training.router``).

Positions counted in the loss: index t predicts token x_{t+2}, so its weight is the
assistant mask of x_{t+2} (padding and prompt tokens excluded).

``loss_vocab`` (a training-speed option, ours): the logit losses are computed over the N
tokens the target writes most often in the training features instead of all V, for the
target's distribution (softmax over those N logits) and the drafter's alike; the drafter
itself is unchanged and still served with the full head, and held-out scoring (eval mode)
uses the full head. The three LM-head products of a step (target, drafter forward and
backward) are most of its cost, so they shrink by V/N (``benchmarks/bench_trainer.py``);
whether held-out top-1 holds is measured by ``benchmarks/recipe_study.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vllm_coral.models.eagle import EagleConfig, EagleDrafter
from vllm_coral.models.checkpoint import load_checkpoint, portable_path
from vllm_coral.models.registry import save_drafter, validate_drafter
from vllm_coral.training.losses import (
    csra_loss,
    feature_loss,
    soft_ce_loss,
    target_distribution,
    top1_accuracy,
    topk_distill_loss,
)
from vllm_coral.training.recipes import Recipe, knob

__all__ = ["CORAL", "CSRA", "EAGLE", "HASS", "TopKDistill", "UnrolledConfig", "attach_loss_vocab", "exporter",
           "hass_attention_mask", "loss_head", "next_token_weight", "unrolled_loss", "unrolled_steps", "warm_start"]  # fmt: skip



@dataclass(frozen=True)
class TopKDistill:
    """HASS's harmonized objective distillation: -sum_{v in TopK(p)} p(v) log q(v)."""

    weight: float = knob(1.0, "weight of the top-K distillation loss")
    k: int = knob(10, "K: the target's top tokens distilled")


@dataclass(frozen=True)
class CSRA:
    """CORAL's cross-step representation alignment (InfoNCE across unrolled steps)."""

    weight: float = knob(0.1, "lambda: weight of the CSRA loss")
    temperature: float = knob(0.1, "tau_c: InfoNCE temperature on cosine similarity")

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"csra temperature must be positive, got {self.temperature}")


@dataclass(frozen=True)
class UnrolledConfig:
    unroll: int = knob(1, "drafting steps unrolled per position (EAGLE 1, HASS 3)")
    noise_std: float = knob(0.2, "input-feature noise width: (U(0,1) - 0.5) * noise_std")
    feature_weight: float = knob(1.0, "weight of SmoothL1(h, f_next)")
    ce_weight: float = knob(0.1, "weight of the soft cross-entropy on logits")
    topk: TopKDistill | None = knob(None, "HASS top-K distillation (--no-topk: off)")
    csra: CSRA | None = knob(None, "CORAL cross-step alignment (--no-csra: off)")
    loss_vocab: int | None = knob(None, "train the logit losses on the N most written tokens only (none: all)")
    init: str | None = knob(None, "start from this drafter checkpoint of the recipe's family (a warm start, e.g. "
                                  "HASS or CORAL from a trained EAGLE drafter) instead of random weights")

    def __post_init__(self) -> None:
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.csra is not None and self.unroll < 2:
            raise ValueError("CSRA aligns unrolled steps: it needs unroll >= 2")


def hass_attention_mask(seq_len: int, step: int, device=None) -> torch.Tensor:
    """[S, step*S] bool: query t may read key s of unroll step i (1-based) iff s <= t and
    i == max(1, step - (t - s)); keys are laid out step-major (step 1's S keys first)."""
    t = torch.arange(seq_len, device=device)[:, None]
    s = torch.arange(seq_len, device=device)[None, :]
    src = torch.clamp(step - (t - s), min=1)  # [S, S] which step key s comes from
    blocks = [(s <= t) & (src == i) for i in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


def unrolled_steps(drafter, emb: torch.Tensor, f_in: torch.Tensor, positions: torch.Tensor, unroll: int):
    """Yield (j, predict_j, regress_j) [B, S, H] for j = 1..unroll, HASS-style (module docstring).

    emb [B, S, H] = E[x_{t+1}], f_in [B, S, H] = target features (+ noise). Step j >= 2
    reads the detached step-(j-1) regress output of index t-1 as its input feature at index
    t. ``predict`` goes to the LM head, ``regress`` is held to f_{t+1} and fed back: one
    tensor for EAGLE (its ``run_layer`` returns one output), FSPAD's PAD halves for FSPAD.
    """
    S = emb.shape[1]
    kv_inputs: list[torch.Tensor] = []
    prev = None
    for j in range(1, unroll + 1):
        own = f_in if j == 1 else torch.cat([f_in[:, :1], prev[:, :-1].detach()], dim=1)  # t reads h^{j-1}_{t-1}
        x = drafter.layer_input(emb, own)
        kv_inputs.append(x)
        if j == 1:
            out = drafter.run_layer(x, positions)
        else:
            attn = hass_attention_mask(S, j, emb.device)[None, None]
            out = drafter.run_layer(x, positions, attn, kv_inputs)
        predict, regress = out if isinstance(out, tuple) else (out, out)
        prev = regress
        yield j, predict, regress


def next_token_weight(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S-1]: index t predicts x_{t+2}, so it counts where x_{t+2} is assistant-written."""
    return torch.cat([mask[:, 2:], torch.zeros_like(mask[:, :1])], dim=1)


def _build(cfg: UnrolledConfig, head, data) -> EagleDrafter:
    drafter = warm_start(EagleDrafter(EagleConfig.from_target(head.config)), cfg, head, "eagle")
    return attach_loss_vocab(drafter, cfg, head, data)


def warm_start(drafter: torch.nn.Module, cfg: UnrolledConfig, head, family: str) -> torch.nn.Module:
    """``drafter`` with the weights of checkpoint ``cfg.init`` (validated against the target),
    or as it is when there is none; a checkpoint of another family or shape is refused."""
    if cfg.init is None:
        return drafter
    ckpt = validate_drafter(cfg.init, head.config)
    if ckpt.family.name != family:
        raise ValueError(f"--init {cfg.init}: a {ckpt.family.name} drafter, but this recipe trains {family} drafters")
    if ckpt.config != drafter.config:
        raise ValueError(f"--init {cfg.init}: its config {ckpt.config} is not the one this run builds ({drafter.config})")
    drafter.load_checkpoint_tensors(load_checkpoint(ckpt.path, ckpt.config.tensor_specs()))
    return drafter


def attach_loss_vocab(drafter: torch.nn.Module, cfg: UnrolledConfig, head, data) -> torch.nn.Module:
    """``cfg.loss_vocab`` most written tokens as a buffer of ``drafter`` (not saved: a
    training-time choice, recomputed from the data on resume)."""
    if cfg.loss_vocab:
        drafter.register_buffer("loss_vocab", data.most_written(head.vocab_size, cfg.loss_vocab), persistent=False)
    return drafter


def loss_head(module: torch.nn.Module, head):
    """The head the logit losses use: restricted to ``module.loss_vocab`` while training."""
    vocab = getattr(module, "loss_vocab", None)
    return head.rows(vocab) if module.training and vocab is not None else head


def unrolled_loss(cfg: UnrolledConfig, drafter, head, batch):
    """All loss terms of one batch; returns (total, {name: value})."""
    ids, feats = batch.ids, batch.feats
    emb = head.embed_ids(ids[:, 1:])  # [B, S, H]
    head = loss_head(drafter, head) if cfg.loss_vocab else head
    S = ids.shape[1] - 1  # index t in [0, S): inputs (x_{t+1}, f_t), target f_{t+1}
    f_in, f_next = feats[:, :-1], feats[:, 1:]
    if drafter.training:  # no noise when scoring held-out data
        noise = (torch.rand(ids.shape[0], S, feats.shape[-1], generator=batch.generator) - 0.5) * cfg.noise_std
        f_in = f_in + noise.to(feats.device)
    weight = next_token_weight(batch.mask)
    keep = weight > 0
    with torch.no_grad():
        target = target_distribution(head.logits(f_next[keep]), cfg.topk.k if cfg.topk else 0)
    terms: dict[str, float] = {}
    total = 0.0
    common = keep.clone()
    common[:, : cfg.unroll - 1] = False  # indices every unrolled step scores
    csra_rows = []
    for j, predict, regress in unrolled_steps(drafter, emb, f_in, torch.arange(S, device=ids.device), cfg.unroll):
        sel = keep.clone()
        sel[:, : j - 1] = False
        log_q = head.logits(predict[sel]).float().log_softmax(-1)  # cast once: every term reads it
        ones = torch.ones(log_q.shape[0], device=log_q.device)
        step_total, step_terms = _step_terms(cfg, regress[sel], f_next[sel], log_q, target.select(sel[keep]), ones)
        terms.update({f"{name}_step{j}": v for name, v in step_terms.items()})
        total = total + step_total / cfg.unroll
        csra_rows.append(regress[common])
    if cfg.csra is not None:
        l_csra = csra_loss(csra_rows, cfg.csra.temperature)
        total = total + cfg.csra.weight * l_csra
        terms["loss/csra"] = l_csra.item()
    terms = {"loss/total": total.item(), **terms}
    return total, terms


def _step_terms(cfg: UnrolledConfig, h, f_next, log_q, target, ones):
    l_feat = feature_loss(h, f_next, ones)
    l_ce = soft_ce_loss(log_q, target, ones)
    total = cfg.feature_weight * l_feat + cfg.ce_weight * l_ce
    terms = {"acc/top1": top1_accuracy(log_q, target, ones).item(), "loss/feature": l_feat.item(),
             "loss/ce": l_ce.item()}  # fmt: skip
    if cfg.topk is not None:
        l_topk = topk_distill_loss(log_q, target, ones)
        total = total + cfg.topk.weight * l_topk
        terms["loss/topk"] = l_topk.item()
    return total, terms


def exporter(name: str, family: str = "eagle"):
    def export(cfg, drafter, head, out: Path, training: dict) -> list[Path]:
        if cfg.init is not None:  # a warm start records the checkpoint it continued
            training = {**training, "init": portable_path(cfg.init)}
        return [save_drafter(drafter, out / "drafter", family=family, recipe=name, training=training)]

    return export


def _recipe(name: str, preset: UnrolledConfig, help: str) -> Recipe:
    return Recipe(name=name, family="eagle", preset=preset, build=_build, loss=unrolled_loss, export=exporter(name),
                  help=help)


EAGLE = _recipe("eagle", UnrolledConfig(), "EAGLE-1/2: feature regression + 0.1 soft CE, one step")
HASS = _recipe("hass", replace(EAGLE.preset, unroll=3, topk=TopKDistill()),
               "HASS: 3 harmonized unrolled steps + top-10 distillation")  # fmt: skip
CORAL = _recipe("coral", replace(HASS.preset, csra=CSRA()), "CORAL: HASS + cross-step representation alignment")

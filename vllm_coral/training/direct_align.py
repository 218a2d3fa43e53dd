"""Direct alignment of a small-LM drafter (``vllm_coral.models.small_lm``): distil the
target's next-token distributions into a standalone few-layer LM on the target's own text.

Data: the features of the target-generated conversations (``vllm-coral data features``).
The drafter reads only the token ids; the stored post-norm target features f_t give the
target's distribution at no extra target cost, p_t = softmax(W f_t), which is the
distribution of x_{t+1}. Position t counts where x_{t+1} was written by the assistant
(the target's own responses: the paper's distillation set).

Losses (``vllm_coral.training.distill_losses``, where TVD++'s estimator is derived):

- ``kd``: forward KL(p || q);
- ``tvd``: exact total variation 1/2 sum |p - q| (1 - TVD is the T=1 acceptance rate);
- ``tvdpp``: TVD++, the policy-gradient form of TVD with the normalised reward, sampled
  (``tvdpp_samples`` tokens per position from q, drawn from the batch's seeded generator,
  so resumed runs repeat them);
- ``ce``: the written next token only (sequence-level KD: no target distribution). It is
  also the pretraining loss: ``ce`` alone reads token-only shards of plain text
  (``vllm-coral data text``), the paper's first stage.

Every batch also reports ``acc/top1`` (argmax q = argmax p: the T=0 acceptance of a
drafted token whose context was accepted, since the conversations are the target's own
greedy text), ``loss/tvd`` and ``loss/kd`` whichever loss trains, so runs with different
losses are compared on the same scale; on text tokens, ``acc/written`` (argmax q = the
written token) and ``loss/ce``.

Unlike the feature drafters' recipes there is no ``--loss-vocab``: this drafter trains its
own (tied) head, so a loss over the N most written tokens trains only those rows, and the
others keep the logits of the initialisation and win the argmax over the full vocabulary.
Measured: 250 steps of KD over 8,192 tokens reached top-1 0.22-0.37 on training batches
(restricted) but 0.021 on held-out data (full vocabulary). Every loss here runs over the
whole vocabulary.

Initialisation (``init``): "target" takes the target's embedding, final norm and
``init_layers`` (projected when ``hidden_size`` is narrower; see the model module),
"scratch" is transformers' random init, and a folder continues from a small-LM checkpoint
(for example one trained with ``ce`` first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vllm_coral.models.registry import load_drafter
from vllm_coral.models.small_lm import (
    SmallLMConfig,
    SmallLMDrafter,
    default_init_layers,
    init_from_target,
    save_small_lm,
)
from vllm_coral.training.distill_losses import kd_loss, tvd_loss, tvd_pp_loss
from vllm_coral.training.losses import masked_mean
from vllm_coral.training.recipes import Recipe, knob

__all__ = ["DISTILL", "DirectAlignConfig", "build_small_lm", "direct_align_loss"]

LOSSES = ("kd", "tvd", "tvdpp", "ce")


@dataclass(frozen=True)
class DirectAlignConfig:
    # The training loss (module docstring).
    loss: str = knob("tvdpp", "kd | tvd | tvdpp | ce (ce: the written next token only)")
    # Decoder layers of the drafter.
    layers: int = knob(2, "decoder layers of the drafter")
    # Drafter width; None: the target's.
    hidden_size: int | None = knob(None, "drafter width (none: the target's; narrower projects the target's weights)")
    # Where the weights start: "target", "scratch", or a small-LM checkpoint folder.
    init: str = knob("target", "target | scratch | a small-LM checkpoint folder to continue from")
    # Target layers copied by init=target; None: its first `layers` layers (an early exit).
    init_layers: tuple[int, ...] | None = knob(None, "target layers copied by --init target (none: the first --layers)")
    # TVD++: tokens sampled from q per position.
    tvdpp_samples: int = knob(4, "TVD++: tokens sampled from the drafter per position")
    # dtype of the written checkpoint (bfloat16 halves what is committed and served).
    checkpoint_dtype: str = knob("float32", "float32 | bfloat16: dtype of the written checkpoint")

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.layers < 1 or self.tvdpp_samples < 1:
            raise ValueError("layers and tvdpp_samples must be >= 1")
        if self.init_layers is not None and len(self.init_layers) != self.layers:
            raise ValueError(f"--init-layers names {len(self.init_layers)} layers for --layers {self.layers}")
        if self.checkpoint_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"checkpoint_dtype must be float32 or bfloat16, got {self.checkpoint_dtype!r}")


def build_small_lm(cfg: DirectAlignConfig, head, data) -> SmallLMDrafter:
    """The drafter to train, initialised as ``cfg.init`` says (module docstring)."""
    target = head.config
    config = SmallLMConfig.from_target(target, num_hidden_layers=cfg.layers, hidden_size=cfg.hidden_size)
    if cfg.init not in ("target", "scratch"):
        drafter, ckpt = load_drafter(cfg.init, target)
        got = ckpt.config
        if (got.num_hidden_layers, got.hidden_size) != (config.num_hidden_layers, config.hidden_size):
            raise ValueError(f"--init {cfg.init}: {got.num_hidden_layers} layers of width {got.hidden_size}, "
                             f"but --layers {cfg.layers} --hidden-size {config.hidden_size} were asked for")  # fmt: skip
        drafter = drafter.float()
        drafter.config = config
    else:
        drafter = SmallLMDrafter(config)
        if cfg.init == "target":
            if head.path is None:
                raise ValueError("--init target needs the target checkpoint folder")
            layers = cfg.init_layers or default_init_layers(target["num_hidden_layers"], cfg.layers)
            state = {}
            for path in sorted(Path(head.path).glob("*.safetensors")):
                state.update(load_file(str(path)))
            drafter.load_checkpoint_tensors(init_from_target(config, state, layers))
    return drafter


def _sample(q: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[n, k] tokens drawn from the rows of q [n, V] by inverse CDF with the CPU generator
    (the same draws on every device)."""
    u = torch.rand(q.shape[0], k, generator=generator, dtype=torch.float64).to(q.device)
    cdf = q.double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(q.shape[-1] - 1)


def direct_align_loss(cfg: DirectAlignConfig, drafter: SmallLMDrafter, head, batch):
    """(loss, terms) of one batch: position t of ids[:, :-1] predicts x_{t+1}.

    Held-out scoring (``drafter.training`` False) runs the vocabulary-wide terms over
    chunks of positions: [n, 49152] float32 tensors of a whole batch would take GBs."""
    ids = batch.ids
    keep = batch.mask[:, 1:] > 0  # [B, S-1] x_{t+1} written by the assistant
    hidden = drafter(ids[:, :-1])[keep]  # [n, H']
    feats = None if batch.feats is None else batch.feats[:, :-1][keep]  # [n, H]; None: text tokens
    nxt = ids[:, 1:][keep]  # [n]
    n = hidden.shape[0]
    step = n if drafter.training else _EVAL_CHUNK
    total, sums = 0.0, {}
    for a in range(0, max(n, 1), step):
        sl = slice(a, min(n, a + step))
        if feats is None:
            loss, terms = _text_terms(drafter.logits(hidden[sl]).float(), nxt[sl])
        else:
            loss, terms = _terms(cfg, drafter, head, hidden[sl], feats[sl], nxt[sl], batch.generator)
        share = (sl.stop - sl.start) / max(n, 1)
        total = total + loss * share
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v * share
    return total, {"loss/total": float(total.detach()), **sums}


_EVAL_CHUNK = 1024


def _terms(cfg, drafter, head, hidden, feats, nxt, generator) -> tuple[torch.Tensor, dict]:
    """The loss and the reported terms of positions with drafter outputs ``hidden`` [n, H'],
    target features ``feats`` [n, H] and written next tokens ``nxt`` [n]."""
    z = drafter.logits(hidden).float()  # [n, V]
    ones = torch.ones(z.shape[0], device=z.device)
    with torch.no_grad():
        p_logits = head.logits(feats).float()  # [n, V]
    if cfg.loss == "kd":
        loss = kd_loss(z, p_logits, ones)
    elif cfg.loss == "tvd":
        loss = tvd_loss(z, p_logits, ones)
    elif cfg.loss == "tvdpp":
        tokens = _sample(z.detach().softmax(-1), cfg.tvdpp_samples, generator)
        loss = tvd_pp_loss(z, p_logits, ones, tokens=tokens)
    else:
        loss = torch.nn.functional.cross_entropy(z, nxt)
    with torch.no_grad():  # the trained loss is its own metric: no second pass over [n, V]
        terms = {"acc/top1": masked_mean((z.argmax(-1) == p_logits.argmax(-1)).float(), ones).item()}
        for name, fn in (("kd", kd_loss), ("tvd", tvd_loss)):
            terms[f"loss/{name}"] = (loss if cfg.loss == name else fn(z, p_logits, ones)).item()
    return loss, terms


def _text_terms(z: torch.Tensor, nxt: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Pretraining on text tokens: cross-entropy on the written token, and its top-1."""
    loss = torch.nn.functional.cross_entropy(z, nxt)
    return loss, {"acc/written": (z.detach().argmax(-1) == nxt).float().mean().item(), "loss/ce": loss.item()}


def _reads_text(cfg: DirectAlignConfig) -> bool:
    return cfg.loss == "ce"


def _export(cfg: DirectAlignConfig, drafter: SmallLMDrafter, head, out: Path, training: dict) -> list[Path]:
    return [save_small_lm(drafter, out / "drafter", head.path, dtype=cfg.checkpoint_dtype, training=training)]


DISTILL = Recipe(name="small-lm", family="small_lm", preset=DirectAlignConfig(), build=build_small_lm,
                 loss=direct_align_loss, export=_export, reads_text=_reads_text, loop_defaults={"lr": 3e-4},
                 help="small-LM drafter distilled from the target (KD, TVD or TVD++), served by plain vLLM")  # fmt: skip

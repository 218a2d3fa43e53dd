"""Train EAGLE-style drafters on extracted features: EAGLE-1/2, HASS and CORAL, one loop.

EAGLE (``unroll=1``): at index t the drafter reads E[x_{t+1}] and the target feature f_t
(+ uniform noise, (U(0,1) - 0.5) * noise_std as in the EAGLE code) and predicts f_{t+1}:
loss = SmoothL1(h, f_{t+1}) + ce_weight * CE(softmax(W f_{t+1}), softmax(W h)).

HASS (``unroll=3``, harmonized context alignment + ``topk_weight`` * top-K distillation):
step j >= 2 feeds the drafter's own step-(j-1) output of index t-1 (detached) as the input
feature at index t, exactly what drafting step j sees at inference. Its attention must see
the context as inference does too: key s of query t comes from step
``max(1, j - (t - s))``: the verified prefix (s <= t-j+1) from target features (step 1)
and the j-1 most recent positions from the draft steps that produced them. Worked example
j=2, S=3: t=0 -> key 0 from step 2; t=1 -> key 0 from step 1, key 1 from step 2;
t=2 -> keys 0, 1 from step 1, key 2 from step 2. Indices t < j-1 have no step-(j-1)
output to read and are left out of step j's loss. The loss is averaged over steps.

CORAL (``unroll=3`` + ``csra_weight`` * CSRA, ``vllm_coral.training.losses.csra_loss``): the
HASS objective plus an InfoNCE that aligns the drafter's outputs for the same index across
the unrolled steps, over the indices every step scores (t >= unroll-1, assistant tokens).
CORAL's router is trained afterwards with the drafter frozen
(``vllm_coral.training.router``).

Positions counted in the loss: index t predicts token x_{t+2}, so its weight is the
assistant mask of x_{t+2} (padding and prompt tokens excluded).

Infrastructure:
- tqdm progress; TensorBoard scalars (loss terms and top-1 accuracy per unroll step);
- ``--save-every`` checkpoints: the vLLM-loadable drafter folder plus
  ``trainer_state.safetensors`` (weights, AdamW moments) and ``trainer_state.json`` (step,
  config). Nothing is pickled. Data order is a seeded permutation per epoch and the noise
  of step s comes from a generator seeded by (seed, s), so ``--resume`` after a kill
  continues bit-for-bit where the last checkpoint left off;
- ``torchrun --nproc_per_node N``: DDP (gloo on CPU); rank r trains on batches b with
  b % N == r, gradients are averaged, rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from vllm_coral.models.eagle import EagleConfig, EagleDrafter
from vllm_coral.models.target import TargetHead
from vllm_coral.training.features import iter_shards
from vllm_coral.training.losses import csra_loss, feature_loss, soft_ce_loss, top1_accuracy, topk_distill_loss

__all__ = ["TrainConfig", "epoch_batches_of", "hass_attention_mask", "load_sequences", "train", "unrolled_steps",
           "warmup_cosine_lr"]


# Recipe presets; CORAL = HASS + CSRA (tau_c = 0.1, lambda = 0.1: METHODS.md's proposed defaults).
METHODS = {
    "eagle": dict(unroll=1, topk_weight=0.0, csra_weight=0.0),
    "hass": dict(unroll=3, topk_weight=1.0, csra_weight=0.0),
    "coral": dict(unroll=3, topk_weight=1.0, csra_weight=0.1, csra_temperature=0.1),
}


@dataclass(frozen=True)
class TrainConfig:
    # "eagle", "hass" or "coral": names the recipe; the fields below carry the difference.
    method: str = "eagle"
    # Unrolled drafting steps per position (EAGLE 1, HASS 3).
    unroll: int = 1
    # Weight of the soft cross-entropy on logits (EAGLE: 0.1).
    ce_weight: float = 0.1
    # Weight of HASS's top-K distillation (0 disables it) and its K.
    topk_weight: float = 0.0
    topk: int = 10
    # CORAL's CSRA: weight of the cross-step InfoNCE (0 disables it) and its temperature.
    csra_weight: float = 0.0
    csra_temperature: float = 0.1
    # Input-feature noise width: (U(0,1) - 0.5) * noise_std.
    noise_std: float = 0.2
    # Optimisation.
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    epochs: int = 1
    # Stop after this many optimizer steps (None: run all epochs).
    max_steps: int | None = None
    # Sequences are truncated to this many tokens.
    max_seq_len: int = 1024
    # A batch holds whole sequences up to this many tokens (padded to the longest).
    batch_tokens: int = 4096
    # "float32" or "bfloat16" (autocast for the forward pass; weights stay fp32).
    dtype: str = "float32"
    save_every: int = 200
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.csra_weight > 0 and self.unroll < 2:
            raise ValueError("CSRA aligns unrolled steps: csra_weight > 0 needs unroll >= 2")
        if self.csra_temperature <= 0:
            raise ValueError(f"csra_temperature must be positive, got {self.csra_temperature}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.batch_tokens < 2 or self.max_seq_len < 3:
            raise ValueError("batch_tokens must be >= 2 and max_seq_len >= 3")

    @classmethod
    def for_method(cls, method: str, **overrides) -> TrainConfig:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        return cls(method=method, **{**METHODS[method], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def hass_attention_mask(seq_len: int, step: int, device=None) -> torch.Tensor:
    """[S, step*S] bool: query t may read key s of unroll step i (1-based) iff s <= t and
    i == max(1, step - (t - s)); keys are laid out step-major (step 1's S keys first)."""
    t = torch.arange(seq_len, device=device)[:, None]
    s = torch.arange(seq_len, device=device)[None, :]
    src = torch.clamp(step - (t - s), min=1)  # [S, S] which step key s comes from
    blocks = [(s <= t) & (src == i) for i in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


def load_sequences(features: str | Path, max_seq_len: int, hidden_size: int) -> list[tuple]:
    """(ids, mask, feats) per trainable sequence (>= 3 tokens, a scored token), truncated."""
    seqs = []
    for shard in iter_shards(features):
        for x, m, f in shard.sequences():
            if len(x) >= 3 and m[2:].any():
                seqs.append((x[:max_seq_len], m[:max_seq_len], f[:max_seq_len]))
    if not seqs:
        raise ValueError(f"{features}: no trainable sequences")
    if seqs[0][2].shape[-1] != hidden_size:
        raise ValueError(f"{features}: features have hidden size {seqs[0][2].shape[-1]}, the target has {hidden_size}")
    return seqs


def _batches(lengths: list[int], batch_tokens: int, order: list[int]) -> list[list[int]]:
    out, cur, longest = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def epoch_batches_of(lengths: list[int], batch_tokens: int, epochs: int, seed: int) -> list[list[int]]:
    """Token-budget batches of sequence indices, one seeded shuffle per epoch, epochs concatenated."""
    batches = []
    for epoch in range(epochs):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += _batches(lengths, batch_tokens, order)
    return batches


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def _collate(seqs, ids_list, device):
    S = max(len(seqs[i][0]) for i in ids_list)
    H = seqs[ids_list[0]][2].shape[-1]
    B = len(ids_list)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S)
    feats = torch.zeros(B, S, H)
    for row, i in enumerate(ids_list):
        x, m, f = seqs[i]
        ids[row, : len(x)] = x.long()
        mask[row, : len(x)] = m.float()
        feats[row, : len(x)] = f.float()
    return ids.to(device), mask.to(device), feats.to(device)


class UnrolledLoss(torch.nn.Module):
    """The training objective as a module, so DDP wraps one forward call per step."""

    def __init__(self, cfg: TrainConfig, drafter: EagleDrafter, head: TargetHead) -> None:
        super().__init__()
        self.cfg = cfg
        self.drafter = drafter
        self.head = head  # frozen tensors, not parameters: DDP neither syncs nor reduces them

    def forward(self, ids, mask, feats, noise):
        return _step_losses(self.cfg, self.drafter, self.head, ids, mask, feats, noise)


def unrolled_steps(drafter: EagleDrafter, emb: torch.Tensor, f_in: torch.Tensor, positions: torch.Tensor, unroll: int):
    """Yield (j, h_j) [B, S, H] for j = 1..unroll, HASS-style (see the module docstring).

    emb [B, S, H] = E[x_{t+1}], f_in [B, S, H] = target features (+ noise). Step j >= 2
    reads the detached step-(j-1) output of index t-1 as its input feature at index t.
    """
    S = emb.shape[1]
    kv_inputs: list[torch.Tensor] = []
    prev = None
    for j in range(1, unroll + 1):
        if j == 1:
            x = drafter.layer_input(emb, f_in)
            kv_inputs.append(x)
            h = drafter.run_layer(x, positions)
        else:
            own = torch.cat([f_in[:, :1], prev[:, :-1].detach()], dim=1)  # index t reads h^{j-1}_{t-1}
            x = drafter.layer_input(emb, own)
            kv_inputs.append(x)
            attn = hass_attention_mask(S, j, emb.device)[None, None]
            h = drafter.run_layer(x, positions, attn, kv_inputs)
        prev = h
        yield j, h


def _step_losses(cfg, drafter, head, ids, mask, feats, noise):
    """All loss terms of one batch; returns (total, {name: value})."""
    S = ids.shape[1] - 1  # index t in [0, S): inputs (x_{t+1}, f_t), target f_{t+1}
    emb = head.embed_ids(ids[:, 1:])  # [B, S, H]
    f_in = feats[:, :-1] + noise  # noise [B, S, H]
    f_next = feats[:, 1:]
    # index t predicts x_{t+2}: weight by its assistant mask (0 past the end)
    weight = torch.cat([mask[:, 2:], torch.zeros_like(mask[:, :1])], dim=1)
    positions = torch.arange(S, device=ids.device)
    with torch.no_grad():
        keep = weight > 0
        target_logits = head.logits(f_next[keep])

    terms: dict[str, float] = {}
    total = 0.0
    csra_rows: list[torch.Tensor] = []
    common = keep.clone()
    common[:, : cfg.unroll - 1] = False  # indices every unrolled step scores
    for j, h in unrolled_steps(drafter, emb, f_in, positions, cfg.unroll):
        w = weight.clone()
        w[:, : j - 1] = 0
        sel = keep & (w > 0)
        h_sel = h[sel]
        rows = sel[keep]  # which of the kept positions this step scores
        t_logits = target_logits[rows]
        d_logits = head.logits(h_sel.float())
        ones = torch.ones(h_sel.shape[0], device=h.device)
        l_feat = feature_loss(h_sel, f_next[sel], ones)
        l_ce = soft_ce_loss(d_logits, t_logits, ones)
        step_total = l_feat + cfg.ce_weight * l_ce
        if cfg.topk_weight > 0:
            l_topk = topk_distill_loss(d_logits, t_logits, ones, k=cfg.topk)
            step_total = step_total + cfg.topk_weight * l_topk
            terms[f"loss/topk_step{j}"] = l_topk.item()
        terms[f"loss/feature_step{j}"] = l_feat.item()
        terms[f"loss/ce_step{j}"] = l_ce.item()
        terms[f"acc/top1_step{j}"] = top1_accuracy(d_logits, t_logits, ones).item()
        total = total + step_total / cfg.unroll
        if cfg.csra_weight > 0:
            csra_rows.append(h[common])
    if cfg.csra_weight > 0:
        l_csra = csra_loss(csra_rows, cfg.csra_temperature)
        total = total + cfg.csra_weight * l_csra
        terms["loss/csra"] = l_csra.item()
    terms["loss/total"] = total.item()
    return total, terms


_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def training_state_tensors(module: torch.nn.Module, opt: torch.optim.Optimizer, prefix: str = "") -> dict:
    """Weights (``<prefix>model.<name>``) and AdamW moments (``<prefix>opt.<param>.<key>``)."""
    tensors = {f"{prefix}model.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    names = {id(p): n for n, p in module.named_parameters()}
    for p, state in opt.state.items():
        if state:
            for key in _ADAM_KEYS:
                tensors[f"{prefix}opt.{names[id(p)]}.{key}"] = torch.as_tensor(state[key]).detach().clone()
    return tensors


def restore_training_state(module: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict, prefix: str = "") -> None:
    """Inverse of ``training_state_tensors``."""
    head = f"{prefix}model."
    module.load_state_dict({k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)})
    for name, p in module.named_parameters():
        if f"{prefix}opt.{name}.exp_avg" in tensors:
            opt.state[p] = {key: tensors[f"{prefix}opt.{name}.{key}"].clone() for key in _ADAM_KEYS}


def write_state(out: Path, stem: str, tensors: dict, meta: dict) -> None:
    """``<stem>.safetensors`` + ``<stem>.json``, each replaced atomically (a kill leaves the old pair)."""
    tmp = out / f"{stem}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / f"{stem}.safetensors")
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / f"{stem}.json")


def read_state(out: Path, stem: str) -> tuple[dict, dict]:
    """(meta, tensors) written by ``write_state``."""
    return json.loads((out / f"{stem}.json").read_text()), load_file(str(out / f"{stem}.safetensors"))


def _save_state(out: Path, drafter, opt, step: int, cfg: TrainConfig, extra: dict) -> None:
    meta = dict(step=step, train_config=asdict(cfg), drafter_config=drafter.config.to_dict(), **extra)
    write_state(out, "trainer_state", training_state_tensors(drafter, opt), meta)
    drafter.save(out / "drafter", extra={"method": cfg.method, "step": step, **extra})


def _load_state(out: Path, drafter, opt) -> int:
    meta, tensors = read_state(out, "trainer_state")
    restore_training_state(drafter, opt, tensors)
    return int(meta["step"])


def train(
    target: str | Path,
    features: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train a drafter; returns a summary. Works alone or under torchrun (DDP, gloo)."""
    out = Path(out)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(cfg.seed)

    head = TargetHead.load(target)
    dcfg = EagleConfig.from_target(head.config)
    drafter = EagleDrafter(dcfg)
    objective = UnrolledLoss(cfg, drafter, head)
    model = torch.nn.parallel.DistributedDataParallel(objective) if distributed else objective
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    state_file = out / "trainer_state.json"
    if out.exists() and state_file.exists() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or use a new folder")
    if resume and state_file.exists():
        saved = TrainConfig.from_dict(json.loads(state_file.read_text())["train_config"])
        if saved != cfg:
            raise ValueError(f"{out}: --resume with a different config than the saved one ({saved})")
        start_step = _load_state(out, drafter, opt)
    else:
        start_step = 0

    seqs = load_sequences(features, cfg.max_seq_len, head.hidden_size)
    lengths = [len(s[0]) for s in seqs]
    epoch_batches = epoch_batches_of(lengths, cfg.batch_tokens, cfg.epochs, cfg.seed)
    # Each optimizer step consumes `world` batches (one per rank).
    total_steps = len(epoch_batches) // world
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    def lr_at(step: int) -> float:
        return warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, total_steps)

    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=start_step)
    meta = dict(target=str(target), features=str(features), world_size=world)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"train {cfg.method}", file=sys.stderr)
    last_terms: dict[str, float] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(start_step, total_steps):
        batch = epoch_batches[step * world + rank]
        ids, mask, feats = _collate(seqs, batch, "cpu")
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
        noise = (torch.rand(ids.shape[0], ids.shape[1] - 1, feats.shape[-1], generator=gen) - 0.5) * cfg.noise_std
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, terms = model(ids, mask, feats, noise)
        loss.backward()  # under DDP, gradients are averaged across ranks here
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
        opt.step()
        last_terms = terms
        done = step + 1
        if writer is not None and (done % cfg.log_every == 0 or done == total_steps):
            for k, v in terms.items():
                writer.add_scalar(k, v, done)
            writer.add_scalar("lr", lr_at(step), done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss/total']:.3f}", acc1=f"{terms['acc/top1_step1']:.2f}")
        if rank == 0 and (done % cfg.save_every == 0 or done == total_steps):
            _save_state(out, drafter, opt, done, cfg, meta)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if rank == 0 and start_step >= total_steps:
        _save_state(out, drafter, opt, total_steps, cfg, meta)
    summary = dict(steps=total_steps, start_step=start_step, seconds=time.perf_counter() - t0,
                   sequences=len(seqs), world_size=world, last=last_terms, drafter=str(out / "drafter"))  # fmt: skip
    if distributed:
        dist.barrier()
    return summary

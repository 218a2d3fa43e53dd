"""The one training loop every recipe runs in: batching, learning-rate schedule, device and
autocast, DDP, resume and the overwrite guard, state I/O, progress and TensorBoard.

A :class:`~vllm_coral.training.recipes.Recipe` supplies what differs: how to build the
trainable module, the loss of one batch, and what to write as checkpoints. Everything else
is here, once.

Devices (:func:`select_runtime`): ``device="auto"`` is CUDA when available, else the CPU.
``dtype="auto"`` autocasts to bfloat16 on CUDA devices that support it and stays float32
on the CPU (bf16 autocast there is opt-in with ``dtype="bfloat16"``: faster on CPUs with
AVX512-BF16/AMX, emulated and slower elsewhere). Weights and optimizer state stay float32.
Under ``torchrun`` the loop runs DDP with NCCL on CUDA (one device per local rank) and
gloo on the CPU; rank r trains on batches b with b % world == r and gradients are averaged.
FSDP is not offered: a drafter is 4-20M parameters and the frozen target head, the largest
tensor, is not trained, so sharding would save little memory and cost communication.

Checkpoints (every ``save_every`` steps and at the end, rank 0): the recipe's exported
checkpoint(s) plus ``trainer_state.safetensors`` (trainable weights, AdamW moments) and
``trainer_state.json`` (step, recipe, configs). Nothing is pickled. Batch order and noise
are functions of (seed, step, rank), so ``resume=True`` after a kill continues bit-for-bit
(on the same device and dtype) where the last checkpoint left off; resuming with other
settings, or starting over a folder that holds a run without ``resume``, is refused.

Memory on the CPU: every batch has a new [B, S, H] shape, and the process grew step after
step (HASS, 2 threads: 1.4 to 4.1 GB in 165 steps; 14 GB over a CORAL run, which squeezed
the page cache holding the features and slowed training by half). Two causes, two guards:
oneDNN (bf16 matmuls) caches a primitive and its scratch memory per shape, 1,024 of them by
default, so importing ``vllm_coral.training`` sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` to
``ONEDNN_CACHE`` unless it is already set (oneDNN reads it once, at its first primitive);
and glibc's heap fragments (torch allocates CPU tensors straight from malloc), so every
``TRIM_EVERY`` steps the loop hands freed heap pages back with ``malloc_trim`` (nothing
happens on other C libraries). ``benchmarks/trainer_memory.py`` measures both: over 100
HASS steps on real features the trim does most of it (2.7 GB with neither guard, 2.0 with
the trim, 1.8 with both, all at the same speed).
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from vllm_coral.models.checkpoint import portable_path
from vllm_coral.models.target import TargetHead
from vllm_coral.training.dataset import FeatureDataset, epoch_batches
from vllm_coral.training.evaluate import evaluate
from vllm_coral.training.recipes import knob

__all__ = ["LoopConfig", "Runtime", "read_state", "run", "select_runtime", "warmup_cosine_lr", "write_state"]

TRIM_EVERY = 10


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` from the symbols already loaded, or None (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):
        return None


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``); False where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = knob(1, "passes over the training features")
    max_steps: int | None = knob(None, "stop after this many optimizer steps")
    batch_tokens: int = knob(4096, "tokens per batch (whole sequences, padded to the longest)")
    max_seq_len: int = knob(1024, "sequences are truncated to this many tokens")
    lr: float = knob(5e-4, "peak learning rate (linear warm-up, then cosine to 0)")
    warmup_steps: int = knob(50, "linear warm-up steps")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    grad_clip: float | None = knob(0.5, "clip the gradient norm to this (none: off)")
    device: str = knob("auto", "auto | cpu | cuda (auto: CUDA when available)")
    dtype: str = knob("auto", "auto | float32 | bfloat16 autocast (auto: bf16 on CUDA)")
    save_every: int = knob(200, "write a checkpoint every this many steps")
    log_every: int = knob(10, "TensorBoard scalars every this many steps")
    eval_every: int | None = knob(None, "score --heldout-features every this many steps (always at the end)")
    seed: int = knob(0, "data order, noise and initialisation")
    data_fraction: float = knob(1.0, "train on this share of the conversations, a random subset drawn with the seed "
                                     "(data-size ablations; 0.25 is inside 0.5)")

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_tokens < 2 or self.max_seq_len < 3:
            raise ValueError("epochs must be >= 1, batch_tokens >= 2 and max_seq_len >= 3")
        if not 0.0 < self.data_fraction <= 1.0:
            raise ValueError(f"data_fraction must be in (0, 1], got {self.data_fraction}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    # bfloat16 when autocasting, None for plain float32.
    autocast_dtype: torch.dtype | None
    # "nccl" or "gloo" under torchrun, None for one process.
    backend: str | None
    rank: int = 0
    world: int = 1

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)  # fmt: skip


def select_runtime(device: str = "auto", dtype: str = "auto", *, env=None, cuda_available: bool | None = None,
                   bf16_supported: bool | None = None) -> Runtime:  # fmt: skip
    """Device, autocast dtype and DDP backend from the options and ``torchrun``'s environment."""
    env = os.environ if env is None else env
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    if device == "cuda":
        dev = torch.device("cuda", int(env.get("LOCAL_RANK", "0")))
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
    else:
        dev, bf16_supported = torch.device("cpu"), True  # CPU autocast runs bf16 everywhere
    if dtype == "bfloat16" and not bf16_supported:
        raise ValueError(f"--dtype bfloat16: {dev} does not support bfloat16 (use --dtype float32)")
    use_bf16 = dtype == "bfloat16" or (dtype == "auto" and dev.type == "cuda" and bf16_supported)
    backend = None if world == 1 else ("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, torch.bfloat16 if use_bf16 else None, backend, rank, world)


def warmup_cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


# ---------------------------------------------------------------------------- state I/O
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def write_state(out: Path, stem: str, tensors: dict, meta: dict) -> None:
    """``<stem>.safetensors`` + ``<stem>.json``, each replaced atomically (a kill leaves the old pair)."""
    tmp = out / f"{stem}.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / f"{stem}.safetensors")
    tmp = out / f"{stem}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / f"{stem}.json")


def read_state(out: Path, stem: str) -> tuple[dict, dict]:
    """(meta, tensors) written by ``write_state``."""
    return json.loads((out / f"{stem}.json").read_text()), load_file(str(out / f"{stem}.safetensors"))


def _state_tensors(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Trainable weights (``model.<name>``) and AdamW moments (``opt.<name>.<key>``)."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    tensors = {f"model.{n}": p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{n}.{key}"] = torch.as_tensor(value).detach().clone()
    return tensors


def _restore(module: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict) -> None:
    for n, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if f"model.{n}" not in tensors:
            raise ValueError(f"trainer state lacks model.{n}; it was written by another recipe")
        with torch.no_grad():
            p.copy_(tensors[f"model.{n}"])
        if f"opt.{n}.exp_avg" in tensors:
            opt.state[p] = {k: tensors[f"opt.{n}.{k}"].to(p.device).clone() for k in _ADAM_KEYS}


# ---------------------------------------------------------------------------- the loop
@dataclass
class _Run:
    """What one training run holds while it goes (built by ``_setup``)."""

    recipe: object
    cfg: object
    loop: LoopConfig
    rt: Runtime
    out: Path
    head: TargetHead
    data: FeatureDataset
    module: torch.nn.Module
    model: torch.nn.Module  # `module`, or its DDP wrapper
    opt: torch.optim.Optimizer
    batches: list
    total: int
    start: int
    meta: dict
    # Training seconds of earlier invocations (resumed runs), and when this one started.
    seconds_before: float = 0.0
    t0: float = 0.0

    def state_meta(self, step: int) -> dict:
        seconds = self.seconds_before + (time.perf_counter() - self.t0 if self.t0 else 0.0)
        return dict(step=step, recipe=self.recipe.name, recipe_config=asdict(self.cfg), loop=asdict(self.loop),
                    world_size=self.rt.world, train_seconds=round(seconds, 1), **self.meta)  # fmt: skip


class _Objective(torch.nn.Module):
    """The recipe's loss as a module, so DDP wraps one forward call per step."""

    def __init__(self, recipe, cfg, module: torch.nn.Module, head: TargetHead) -> None:
        super().__init__()
        self.recipe, self.cfg, self.inner, self.head = recipe, cfg, module, head

    def forward(self, batch):
        return self.recipe.loss(self.cfg, self.inner, self.head, batch)


def _setup(recipe, cfg, loop: LoopConfig, target, features, out: Path, resume: bool, meta: dict) -> _Run:
    rt = select_runtime(loop.device, loop.dtype)
    if rt.backend and not dist.is_initialized():
        dist.init_process_group(rt.backend)
    if rt.device.type == "cuda":
        torch.cuda.set_device(rt.device)
    state_file = out / "trainer_state.json"
    if state_file.exists() and not resume:
        raise ValueError(f"{out} already holds a training run; pass --resume to continue it or use a new folder")
    torch.manual_seed(loop.seed)
    head = TargetHead.load(target).to(rt.device)
    if rt.autocast_dtype is not None:
        head = head.with_head_dtype(rt.autocast_dtype)
    data = FeatureDataset(features, loop.max_seq_len, head.hidden_size, aux=recipe.uses_aux(cfg),
                          text_ok=recipe.reads_text(cfg), fraction=loop.data_fraction, seed=loop.seed)
    module = recipe.build(cfg, head, data).to(rt.device)
    objective = _Objective(recipe, cfg, module, head)
    ddp_kw = {"device_ids": [rt.device.index]} if rt.device.type == "cuda" else {}
    model = torch.nn.parallel.DistributedDataParallel(objective, **ddp_kw) if rt.backend else objective
    trainable = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=loop.lr, weight_decay=loop.weight_decay)
    batches = epoch_batches(data.lengths(), loop.batch_tokens, loop.epochs, loop.seed)
    total = len(batches) // rt.world  # each optimizer step consumes one batch per rank
    total = total if loop.max_steps is None else min(total, loop.max_steps)
    run_ = _Run(recipe, cfg, loop, rt, out, head, data, module, model, opt, batches, total, 0, meta)
    if resume and state_file.exists():
        saved, tensors = read_state(out, "trainer_state")
        want = json.loads(json.dumps(run_.state_meta(saved["step"])))  # tuples as JSON lists
        # A loop field or recipe knob added since the run was saved counts as its default
        # (the recipe's preset value), so an upgrade does not strand a half-finished run.
        saved["loop"] = {**json.loads(json.dumps(asdict(LoopConfig()))), **saved.get("loop", {})}
        preset = json.loads(json.dumps(asdict(recipe.preset)))
        saved["recipe_config"] = {**preset, **saved.get("recipe_config", {})}
        for key in ("recipe", "recipe_config", "loop", "world_size"):
            if saved.get(key) != want[key]:
                raise ValueError(f"{out}: --resume with a different {key} than the saved run ({saved.get(key)})")
        _restore(module, opt, tensors)
        run_.start = int(saved["step"])
        run_.seconds_before = float(saved.get("train_seconds", 0.0))
    return run_


def _run_tokens(r: _Run) -> int:
    """Tokens in all of the run's steps, resumed ones included (the batches are fixed by the seed),
    so a resumed or already finished run reports its whole-run throughput."""
    return sum(r.data.items[i].length for b in r.batches[: r.total * r.rt.world] for i in b)


def _save(r: _Run, step: int) -> list[Path]:
    r.out.mkdir(parents=True, exist_ok=True)
    write_state(r.out, "trainer_state", _state_tensors(r.module, r.opt), r.state_meta(step))
    return r.recipe.export(r.cfg, r.module, r.head, r.out, dict(step=step, **r.meta))


def _step(r: _Run, step: int) -> dict:
    rt, loop = r.rt, r.loop
    index = step * rt.world + rt.rank
    gen = torch.Generator().manual_seed(loop.seed * 1_000_003 + index)
    batch = r.data.collate(r.batches[index], gen).to(rt.device)
    for group in r.opt.param_groups:
        group["lr"] = warmup_cosine_lr(step, loop.lr, loop.warmup_steps, r.total)
    r.opt.zero_grad(set_to_none=True)
    with rt.autocast():
        loss, terms = r.model(batch)
    loss.backward()  # under DDP, gradients are averaged across ranks here
    if loop.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for p in r.module.parameters() if p.requires_grad], loop.grad_clip)
    r.opt.step()
    return terms


def _observers(r: _Run, progress: bool):
    """(TensorBoard writer, tqdm bar or None) of rank 0."""
    r.out.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(r.out / "tb"), purge_step=r.start)
    if not progress:
        return writer, None
    from tqdm import tqdm

    return writer, tqdm(total=r.total, initial=r.start, desc=f"train {r.recipe.name} ({r.rt.device.type})", file=sys.stderr)


def _evaluate(r: _Run, heldout, step: int, writer) -> dict:
    """Score the held-out features with the recipe's loss (rank 0); TensorBoard + heldout.json."""
    scores = evaluate(r.recipe, r.cfg, r.module, r.head, heldout, max_seq_len=r.loop.max_seq_len,
                      batch_tokens=r.loop.batch_tokens, device=r.rt.device, autocast=r.rt.autocast())  # fmt: skip
    if writer is not None:
        for k, v in scores.items():
            writer.add_scalar(f"heldout/{k}", v, step)
    path = r.out / "heldout.json"
    history = json.loads(path.read_text())["history"] if path.exists() else []
    history = [h for h in history if h["step"] < step] + [{"step": step, **scores}]
    path.write_text(json.dumps({"features": portable_path(heldout), "history": history}, indent=2) + "\n")
    return scores


def run(recipe, cfg, loop: LoopConfig, target: str | Path, features: str | Path, out: str | Path, *,
        resume: bool = False, progress: bool = True, meta: dict | None = None, heldout: str | Path | None = None) -> dict:  # fmt: skip
    """Train ``recipe`` with config ``cfg``; returns a summary. Alone or under torchrun.

    ``heldout``: a features folder scored with the recipe's own loss every ``loop.eval_every``
    steps and at the end (``heldout.json``; ``summary["eval"]``), and handed to ``recipe.finish``."""
    out = Path(out)
    # provenance handed to every recipe's export: made portable once, here (checkpoints are
    # committed and read on other machines)
    meta = {k: portable_path(v) if k in ("target", "features") else v for k, v in (meta or {}).items()}
    r = _setup(recipe, cfg, loop, target, features, out, resume, meta)
    main = r.rt.rank == 0
    writer, bar = _observers(r, progress) if main else (None, None)
    terms: dict[str, float] = {}
    written: list[Path] = []
    t0 = time.perf_counter()
    r.t0 = t0
    r.model.train()
    for step in range(r.start, r.total):
        terms = _step(r, step)
        done = step + 1
        if r.rt.device.type == "cpu" and done % TRIM_EVERY == 0:
            release_freed_memory()
        if writer is not None and (done % loop.log_every == 0 or done == r.total):
            for k, v in terms.items():
                writer.add_scalar(k, v, done)
            writer.add_scalar("lr", warmup_cosine_lr(step, loop.lr, loop.warmup_steps, r.total), done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in list(terms.items())[:2]})
        if main and (done % loop.save_every == 0 or done == r.total):
            written = _save(r, done)
        if main and heldout is not None and loop.eval_every and done % loop.eval_every == 0 and done < r.total:
            t_eval = time.perf_counter()
            _evaluate(r, heldout, done, writer)
            t0 += time.perf_counter() - t_eval  # training throughput excludes scoring
            r.t0 = t0
    seconds = time.perf_counter() - t0
    scores = _evaluate(r, heldout, r.total, writer) if main and heldout is not None else None
    for closable in (bar, writer):
        if closable is not None:
            closable.close()
    if main and r.start >= r.total:
        written = _save(r, r.total)
    summary = dict(steps=r.total, start_step=r.start, seconds=seconds, train_seconds=r.seconds_before + seconds,
                   sequences=len(r.data), world_size=r.rt.world,
                   device=str(r.rt.device), tokens_per_second=_run_tokens(r) / max(r.seconds_before + seconds, 1e-9),
                   last=terms,
                   checkpoints=[str(p) for p in written])  # fmt: skip
    if scores is not None:
        summary["eval"] = scores
    if main:
        summary.update(recipe.finish(r.cfg, r.module, r.head, out, loop, heldout) or {})
    if r.rt.backend:
        dist.barrier()
    return summary

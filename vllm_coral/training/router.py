"""Train CORAL's LM-head router with the drafter frozen (``vllm-coral train coral-router``).

The router r(h) -> N group logits (``vllm_coral.models.coral.Router``) learns where the
*target's* next-token probability mass lies, so that the k groups it picks hold the token
the target will verify. Target for a position with target distribution p = softmax(W f):
the mass per group P_g = sum_{v in g} p(v); loss = soft cross-entropy
-sum_g P_g log softmax(r(h))_g (METHODS.md's proposal). The drafter is frozen, so the
router never changes what a dense drafter would propose; it only decides which rows are
computed.

Router inputs are the drafter's outputs at every drafting step (HASS-style unroll,
``vllm_coral.training.trainer.unrolled_steps``, no noise), since at inference the router
runs on step-1 outputs (from target features) and on later steps (from the drafter's own):
training on step 1 only would leave it blind to the shift of the later steps.

Several variants (partition strategy x N) train in one pass over the data: the costly
part, the target's full-vocabulary softmax per position, is computed once per batch and
shared. k is an inference-time choice: one checkpoint is written per (variant, k).

Held-out metrics per (variant, k), on features the router never saw:
- ``mass``: mean target probability mass inside the selected groups;
- ``target_top1``: how often the target's argmax token is inside them;
- ``draft_top1``: how often the routed drafter proposes the same greedy token as the dense
  drafter (1.0 = routing never changes a greedy draft; the τ cost of routing comes from
  the rest).

Resumable like the drafter trainer: ``router_state.safetensors`` (router weights and AdamW
moments per variant) + ``router_state.json`` every ``save_every`` steps; nothing pickled.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from vllm_coral.models.coral import CoralDrafter, Router, select_groups
from vllm_coral.models.eagle import EagleDrafter
from vllm_coral.models.target import TargetHead
from vllm_coral.models.vocab_groups import STRATEGIES, VocabPartition, partition_vocab
from vllm_coral.training.trainer import (
    _batches,
    _collate,
    epoch_batches_of,
    load_sequences,
    read_state,
    restore_training_state,
    training_state_tensors,
    unrolled_steps,
    warmup_cosine_lr,
    write_state,
)

__all__ = ["RouterTrainConfig", "evaluate_routers", "metrics_table", "token_counts", "train_router"]


@dataclass(frozen=True)
class RouterTrainConfig:
    # Partition strategies to train (each x every num_groups is one router).
    partitions: tuple[str, ...] = ("frequency",)
    # Group counts N.
    num_groups: tuple[int, ...] = (16,)
    # Groups selected at inference (one checkpoint per k; k <= N).
    top_k: tuple[int, ...] = (2,)
    # Drafting steps whose outputs feed the router (the drafter's training unroll).
    unroll: int = 3
    lr: float = 1e-3
    warmup_steps: int = 20
    epochs: int = 1
    max_steps: int | None = None
    batch_tokens: int = 2048
    max_seq_len: int = 1024
    kmeans_iters: int = 10
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for s in self.partitions:
            if s not in STRATEGIES:
                raise ValueError(f"unknown partition {s!r}; choose from {', '.join(STRATEGIES)}")
        if not self.partitions or not self.num_groups or not self.top_k:
            raise ValueError("give at least one partition, one num_groups and one top_k")
        if min(self.num_groups) < 2:
            raise ValueError(f"num_groups must be >= 2, got {min(self.num_groups)}")
        if min(self.top_k) < 1 or max(self.top_k) >= min(self.num_groups):
            raise ValueError(f"every top_k must be in [1, N) for every N; got top_k={list(self.top_k)}, "
                             f"num_groups={list(self.num_groups)}")  # fmt: skip
        if self.unroll < 1 or self.epochs < 1:
            raise ValueError("unroll and epochs must be >= 1")

    def variants(self) -> list[tuple[str, int]]:
        return [(s, n) for s in self.partitions for n in self.num_groups]

    @classmethod
    def from_dict(cls, d: dict) -> RouterTrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


def variant_name(strategy: str, n: int) -> str:
    return f"{strategy}-n{n}"


def token_counts(seqs: list[tuple], vocab_size: int) -> torch.Tensor:
    """[V] how often each token is an assistant (scored) token in the training data."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for x, m, _ in seqs:
        counts += torch.bincount(x[m > 0].long(), minlength=vocab_size)
    return counts


def _router_batches(drafter, head, ids, mask, feats, unroll):
    """Router inputs and the target distribution rows they are scored against.

    Returns h [M, H] (drafter outputs of every step, concatenated), probs [n, V] (target
    next-token distribution at the n kept positions) and rows [M] (row of probs for each h).
    """
    S = ids.shape[1] - 1
    emb = head.embed_ids(ids[:, 1:])
    f_in, f_next = feats[:, :-1], feats[:, 1:]
    weight = torch.cat([mask[:, 2:], torch.zeros_like(mask[:, :1])], dim=1)
    keep = weight > 0
    probs = head.logits(f_next[keep]).softmax(-1)  # [n, V]
    kept_index = torch.full(keep.shape, -1, dtype=torch.long)
    kept_index[keep] = torch.arange(int(keep.sum()))
    hs, rows = [], []
    positions = torch.arange(S)
    for j, h in unrolled_steps(drafter, emb, f_in, positions, unroll):
        sel = keep.clone()
        sel[:, : j - 1] = False
        hs.append(h[sel])
        rows.append(kept_index[sel])
    return torch.cat(hs), probs, torch.cat(rows)


def _partitions(cfg: RouterTrainConfig, head: TargetHead, counts: torch.Tensor) -> dict[str, VocabPartition]:
    out = {}
    for strategy, n in cfg.variants():
        out[variant_name(strategy, n)] = partition_vocab(
            strategy, n, lm_head=head.lm_head, token_counts=counts, kmeans_iters=cfg.kmeans_iters, seed=cfg.seed
        )
    return out


@torch.no_grad()
def evaluate_routers(
    drafter: EagleDrafter,
    head: TargetHead,
    routers: dict[str, Router],
    partitions: dict[str, VocabPartition],
    top_k: tuple[int, ...],
    features: str | Path,
    *,
    unroll: int = 3,
    batch_tokens: int = 2048,
    max_seq_len: int = 1024,
) -> dict[str, dict[str, float]]:
    """Held-out routing quality per '<variant>-k<k>' (see the module docstring)."""
    seqs = load_sequences(features, max_seq_len, head.hidden_size)
    sums: dict[str, dict[str, float]] = {}
    count = 0
    token_groups = {name: part.token_to_group() for name, part in partitions.items()}
    for batch in _batches([len(s[0]) for s in seqs], batch_tokens, list(range(len(seqs)))):
        ids, mask, feats = _collate(seqs, batch, "cpu")
        h, probs, rows = _router_batches(drafter, head, ids, mask, feats, unroll)
        # per kept position, then expanded to the M router inputs (no [M, V] copy of probs)
        target_top1 = probs.argmax(-1)[rows]
        draft_top1 = head.logits(h).argmax(-1)
        count += h.shape[0]
        for name, router in routers.items():
            mass = partitions[name].group_mass(probs)[rows]  # [M, N]
            tok_group = token_groups[name]
            r = router(h)
            for k in top_k:
                chosen = select_groups(r, k)  # [M, k]
                key = f"{name}-k{k}"
                acc = sums.setdefault(key, {"mass": 0.0, "target_top1": 0.0, "draft_top1": 0.0})
                acc["mass"] += mass.gather(1, chosen).sum().item()
                acc["target_top1"] += (chosen == tok_group[target_top1][:, None]).any(1).sum().item()
                acc["draft_top1"] += (chosen == tok_group[draft_top1][:, None]).any(1).sum().item()
    # draft_top1: the routed greedy draft equals the dense one iff the dense argmax's group
    # is selected (the max over a subset that contains the global max is the global max).
    return {key: {m: v / max(count, 1) for m, v in acc.items()} for key, acc in sums.items()}


def _save_state(out: Path, routers, opts, step: int, cfg: RouterTrainConfig, extra: dict) -> None:
    tensors = {}
    for name, router in routers.items():
        tensors.update(training_state_tensors(router, opts[name], prefix=f"{name}."))
    write_state(out, "router_state", tensors, dict(step=step, config=asdict(cfg), **extra))


def _load_state(out: Path, routers, opts) -> int:
    meta, tensors = read_state(out, "router_state")
    for name, router in routers.items():
        restore_training_state(router, opts[name], tensors, prefix=f"{name}.")
    return int(meta["step"])


def train_router(
    target: str | Path,
    drafter_dir: str | Path,
    features: str | Path,
    out: str | Path,
    cfg: RouterTrainConfig,
    *,
    heldout_features: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train every router variant of ``cfg``; writes OUT/<strategy>-n<N>-k<k>/ checkpoints."""
    out = Path(out)
    head = TargetHead.load(target)
    drafter = EagleDrafter.load(drafter_dir, target_config=head.config).requires_grad_(False).eval()
    state_file = out / "router_state.json"
    if state_file.exists() and not resume:
        raise ValueError(f"{out} already holds a router run; pass --resume to continue it or use a new folder")
    if resume and state_file.exists():
        saved = RouterTrainConfig.from_dict(json.loads(state_file.read_text())["config"])
        if saved != cfg:
            raise ValueError(f"{out}: --resume with a different config than the saved one ({saved})")
    out.mkdir(parents=True, exist_ok=True)

    seqs = load_sequences(features, cfg.max_seq_len, head.hidden_size)
    counts = token_counts(seqs, head.vocab_size)
    partitions = _partitions(cfg, head, counts)
    torch.manual_seed(cfg.seed)
    routers = {name: Router(head.hidden_size, p.num_groups) for name, p in partitions.items()}
    opts = {name: torch.optim.AdamW(r.parameters(), lr=cfg.lr) for name, r in routers.items()}
    start = _load_state(out, routers, opts) if resume and state_file.exists() else 0

    lengths = [len(s[0]) for s in seqs]
    batches = epoch_batches_of(lengths, cfg.batch_tokens, cfg.epochs, cfg.seed)
    total = len(batches) if cfg.max_steps is None else min(len(batches), cfg.max_steps)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train router x{len(routers)}", file=sys.stderr)
    meta = dict(target=str(target), drafter=str(drafter_dir), features=str(features))
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(start, total):
        ids, mask, feats = _collate(seqs, batches[step], "cpu")
        with torch.no_grad():
            h, probs, rows = _router_batches(drafter, head, ids, mask, feats, cfg.unroll)
        for name, router in routers.items():
            mass = partitions[name].group_mass(probs)[rows]  # [M, N]
            loss = -(mass * router(h).log_softmax(-1)).sum(-1).mean()
            for group in opts[name].param_groups:
                group["lr"] = warmup_cosine_lr(step, cfg.lr, cfg.warmup_steps, total)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            last[name] = loss.item()
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(last.values()) / len(last):.3f}")
        if done % cfg.save_every == 0 or done == total:
            _save_state(out, routers, opts, done, cfg, meta)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0

    metrics = {}
    if heldout_features is not None:
        for r in routers.values():
            r.eval()
        metrics = evaluate_routers(drafter, head, routers, partitions, cfg.top_k, heldout_features,
                                   unroll=cfg.unroll, batch_tokens=cfg.batch_tokens,
                                   max_seq_len=cfg.max_seq_len)  # fmt: skip
    written = []
    for name, router in routers.items():
        for k in cfg.top_k:
            coral = CoralDrafter.from_eagle(drafter, partitions[name], k)
            coral.router.load_state_dict(router.state_dict())
            path = out / f"{name}-k{k}"
            coral.save(path, extra={"drafter": str(drafter_dir), "router_loss": last.get(name),
                                    "heldout": metrics.get(f"{name}-k{k}")})  # fmt: skip
            written.append(str(path))
    summary = dict(steps=total, start_step=start, seconds=seconds, variants=len(routers), checkpoints=written,
                   final_loss=last, heldout=metrics, config=asdict(cfg))  # fmt: skip
    (out / "router_metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    if metrics:
        (out / "router_metrics.md").write_text(metrics_table(metrics, head.vocab_size))
    return summary


def metrics_table(metrics: dict[str, dict[str, float]], vocab_size: int) -> str:
    """Markdown table of the held-out routing metrics, one row per '<partition>-n<N>-k<k>'."""
    lines = ["| partition | N | k | head rows computed | target mass in groups | target top-1 in groups | "
             "greedy draft unchanged |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, m in metrics.items():
        strategy, n, k = key.rsplit("-", 2)
        n, k = int(n[1:]), int(k[1:])
        rows = min(k * -(-vocab_size // n), vocab_size)
        lines.append(f"| {strategy} | {n} | {k} | {rows / vocab_size:.1%} | {m['mass']:.3f} | {m['target_top1']:.3f} | "
                     f"{m['draft_top1']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"

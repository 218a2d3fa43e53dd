"""Train CORAL's LM-head router with the drafter frozen (``vllm-coral train coral-router``).

The router r(h) -> N group logits (``vllm_coral.models.coral.Router``) learns where the
*target's* next-token probability mass lies, so that the k groups it picks hold the token
the target will verify. Target for a position with target distribution p = softmax(W f):
the mass per group P_g = sum_{v in g} p(v); loss = soft cross-entropy
-sum_g P_g log softmax(r(h))_g (METHODS.md's proposal). The drafter is frozen, so the
router never changes what a dense drafter would propose; it only decides which rows are
computed.

Router inputs are the drafter's outputs at every drafting step (HASS-style unroll,
``vllm_coral.training.unrolled.unrolled_steps``, no noise), since at inference the router
runs on step-1 outputs (from target features) and on later steps (from the drafter's own):
training on step 1 only would leave it blind to the shift of the later steps.

Several variants (partition strategy x N) train in one pass over the data: the costly
part, the target's full-vocabulary softmax per position, is computed once per batch and
shared. Their losses are summed into one AdamW: the routers share no parameter, and AdamW
updates each parameter from its own gradient alone, so this equals one optimizer per
router. k is an inference-time choice: one checkpoint is written per (variant, k).

Held-out metrics per (variant, k), on features the router never saw:
- ``mass``: mean target probability mass inside the selected groups;
- ``target_top1``: how often the target's argmax token is inside them;
- ``draft_top1``: how often the routed drafter proposes the same greedy token as the dense
  drafter (1.0 = routing never changes a greedy draft; the τ cost of routing comes from
  the rest).

It is a recipe of the one training loop (``vllm_coral.training.loop``): resumable,
device-aware and DDP-capable like the drafter recipes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_coral.models.checkpoint import CheckpointError, portable_path
from vllm_coral.models.coral import CoralDrafter, Router, select_groups
from vllm_coral.models.coral3 import Coral3Drafter
from vllm_coral.models.eagle3 import Eagle3Drafter
from vllm_coral.models.registry import load_drafter, read_drafter, save_drafter
from vllm_coral.models.target import TargetHead
from vllm_coral.models.vocab_groups import STRATEGIES, VocabPartition, partition_vocab
from vllm_coral.training.dataset import Batch, FeatureDataset, token_batches
from vllm_coral.training.recipes import Recipe, knob
from vllm_coral.training.ttt import ttt_steps
from vllm_coral.training.unrolled import next_token_weight, unrolled_steps

__all__ = ["ROUTED", "ROUTER", "RouterBank", "RouterConfig", "draft_logits", "evaluate_routers", "metrics_table",
           "router_inputs"]  # fmt: skip

# Drafter families a router can be trained for.
ROUTED = ("eagle", "eagle3")



@dataclass(frozen=True)
class RouterConfig:
    drafter: str = knob("", "the frozen EAGLE or EAGLE-3 drafter folder (required)")
    partitions: tuple[str, ...] = knob(("frequency",), f"vocabulary partitions: {', '.join(STRATEGIES)}")
    num_groups: tuple[int, ...] = knob((16,), "group counts N (one router per partition x N)")
    top_k: tuple[int, ...] = knob((2,), "groups computed per token k (one checkpoint per k)")
    unroll: int = knob(3, "drafting steps whose outputs feed the router")
    kmeans_iters: int = knob(10, "balanced k-means iterations (kmeans partition)")

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
        if self.unroll < 1:
            raise ValueError("unroll must be >= 1")

    def variants(self) -> list[tuple[str, int]]:
        return [(s, n) for s in self.partitions for n in self.num_groups]


def variant_name(strategy: str, n: int) -> str:
    return f"{strategy}-n{n}"


class RouterBank(torch.nn.Module):
    """Every router variant, plus the frozen drafter whose outputs they route."""

    def __init__(self, drafter: torch.nn.Module, partitions: dict[str, VocabPartition], drafter_recipe: str) -> None:
        super().__init__()
        self.drafter = drafter.requires_grad_(False).eval()
        self.partitions = partitions
        self.drafter_recipe = drafter_recipe
        self.routers = torch.nn.ModuleDict({n: Router(drafter.config.hidden_size, p.num_groups)
                                            for n, p in partitions.items()})  # fmt: skip

    def train(self, mode: bool = True) -> RouterBank:
        super().train(mode)
        self.drafter.eval()  # frozen: always in inference mode
        return self


def router_inputs(drafter, head: TargetHead, batch: Batch, unroll: int):
    """Router inputs and the target distribution rows they are scored against.

    Returns h [M, H] (what the drafter's head reads at every step, concatenated: an EAGLE
    drafter's output feature, an EAGLE-3 drafter's normed output), probs [n, R] (target
    next-token distribution at the n kept positions over the drafter's head rows: the
    whole vocabulary, or an EAGLE-3 draft vocabulary renormalised) and rows [M] (row of
    probs for each h).
    """
    ids, feats = batch.ids, batch.feats
    S = ids.shape[1] - 1
    emb = head.embed_ids(ids[:, 1:])
    keep = next_token_weight(batch.mask) > 0
    probs = head.logits(feats[:, 1:][keep]).float().softmax(-1)  # [n, V]
    if isinstance(drafter, Eagle3Drafter):
        if drafter.config.draft_vocab_size:
            probs = probs[:, drafter.draft_ids]
            probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
        g = drafter.combine(batch.aux[:, :-1])
        steps = ((j, normed) for j, normed, _ in ttt_steps(drafter, emb, g, unroll, detach=True))
    else:
        positions = torch.arange(S, device=ids.device)
        steps = ((j, h) for j, h, _ in unrolled_steps(drafter, emb, feats[:, :-1], positions, unroll))
    kept_index = torch.full(keep.shape, -1, dtype=torch.long, device=ids.device)
    kept_index[keep] = torch.arange(int(keep.sum()), device=ids.device)
    hs, rows = [], []
    for j, h in steps:
        sel = keep.clone()
        sel[:, : j - 1] = False
        hs.append(h[sel])
        rows.append(kept_index[sel])
    return torch.cat(hs), probs, torch.cat(rows)


def draft_logits(drafter, h: torch.Tensor, head: TargetHead) -> torch.Tensor:
    """[M, H] -> [M, R]: the dense drafter's logits over its head rows."""
    return drafter.logits(h, head) if isinstance(drafter, Eagle3Drafter) else head.logits(h)


def _head_rows(drafter, head: TargetHead, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [R, H], their token counts [R]) that the router's groups partition."""
    if isinstance(drafter, Eagle3Drafter) and drafter.config.draft_vocab_size:
        return drafter.draft_head.float().cpu(), counts[drafter.draft_ids.cpu()]
    return head.lm_head.float().cpu(), counts


def _build(cfg: RouterConfig, head: TargetHead, data: FeatureDataset) -> RouterBank:
    if not cfg.drafter:
        raise ValueError("--drafter is required: the EAGLE or EAGLE-3 drafter folder the router serves")
    drafter, ckpt = load_drafter(cfg.drafter, head.config)
    if ckpt.family.name not in ROUTED:
        raise CheckpointError(f"{cfg.drafter}: a router needs an eagle or eagle3 drafter, not {ckpt.family.name}")
    lm_rows, counts = _head_rows(drafter, head, data.token_counts(head.vocab_size))
    partitions = {variant_name(s, n): partition_vocab(s, n, lm_head=lm_rows, token_counts=counts,
                                                      kmeans_iters=cfg.kmeans_iters, seed=0)
                  for s, n in cfg.variants()}  # fmt: skip
    return RouterBank(drafter, partitions, ckpt.recipe)


def _loss(cfg: RouterConfig, bank: RouterBank, head: TargetHead, batch: Batch):
    with torch.no_grad():
        h, probs, rows = router_inputs(bank.drafter, head, batch, cfg.unroll)
    total, terms = 0.0, {}
    for name, router in bank.routers.items():
        mass = bank.partitions[name].group_mass(probs)[rows]  # [M, N]
        loss = -(mass * router(h).float().log_softmax(-1)).sum(-1).mean()
        total = total + loss
        terms[f"loss/{name}"] = loss.item()
    return total, {"loss/mean": total.item() / len(bank.routers), **terms}


def _export(cfg: RouterConfig, bank: RouterBank, head, out: Path, training: dict) -> list[Path]:
    written = []
    meta = dict(training, drafter=portable_path(cfg.drafter), drafter_recipe=bank.drafter_recipe)
    family = "coral3" if isinstance(bank.drafter, Eagle3Drafter) else "coral"
    build = Coral3Drafter.from_eagle3 if family == "coral3" else CoralDrafter.from_eagle
    for name, router in bank.routers.items():
        for k in cfg.top_k:
            coral = build(bank.drafter, bank.partitions[name], k)
            coral.router.load_state_dict(router.state_dict())
            written.append(save_drafter(coral.cpu(), out / f"{name}-k{k}", family=family, recipe="coral-router",
                                        training=meta))  # fmt: skip
    return written


def _finish(cfg: RouterConfig, bank: RouterBank, head: TargetHead, out: Path, loop, heldout) -> dict:
    if heldout is None:
        return {}
    bank.eval()
    metrics = evaluate_routers(bank, head, cfg.top_k, heldout, unroll=cfg.unroll,
                               batch_tokens=loop.batch_tokens, max_seq_len=loop.max_seq_len)  # fmt: skip
    (out / "router_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    rows = next(iter(bank.partitions.values())).vocab_size
    (out / "router_metrics.md").write_text(metrics_table(metrics, rows))
    return {"heldout": metrics}


@torch.no_grad()
def evaluate_routers(bank: RouterBank, head: TargetHead, top_k: tuple[int, ...], features: str | Path, *,
                     unroll: int = 3, batch_tokens: int = 2048, max_seq_len: int = 1024) -> dict[str, dict[str, float]]:  # fmt: skip
    """Held-out routing quality per '<variant>-k<k>' (see the module docstring)."""
    data = FeatureDataset(features, max_seq_len, head.hidden_size, aux=isinstance(bank.drafter, Eagle3Drafter))
    device = head.lm_head.device
    sums: dict[str, dict[str, float]] = {}
    count = 0
    token_groups = {name: part.token_to_group().to(device) for name, part in bank.partitions.items()}
    for indices in token_batches(data.lengths(), batch_tokens, list(range(len(data)))):
        batch = data.collate(indices, torch.Generator()).to(device)
        h, probs, rows = router_inputs(bank.drafter, head, batch, unroll)
        # per kept position, then expanded to the M router inputs (no [M, V] copy of probs)
        target_top1 = probs.argmax(-1)[rows]
        draft_top1 = draft_logits(bank.drafter, h, head).argmax(-1)
        count += h.shape[0]
        for name, router in bank.routers.items():
            mass = bank.partitions[name].group_mass(probs)[rows]  # [M, N]
            tok_group = token_groups[name]
            r = router(h)
            for k in top_k:
                chosen = select_groups(r, k)  # [M, k]
                acc = sums.setdefault(f"{name}-k{k}", {"mass": 0.0, "target_top1": 0.0, "draft_top1": 0.0})
                acc["mass"] += mass.gather(1, chosen).sum().item()
                acc["target_top1"] += (chosen == tok_group[target_top1][:, None]).any(1).sum().item()
                acc["draft_top1"] += (chosen == tok_group[draft_top1][:, None]).any(1).sum().item()
    # draft_top1: the routed greedy draft equals the dense one iff the dense argmax's group
    # is selected (the max over a subset that contains the global max is the global max).
    return {key: {m: v / max(count, 1) for m, v in acc.items()} for key, acc in sums.items()}


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


def _reads_aux(cfg: RouterConfig) -> bool:
    """An EAGLE-3 drafter's router inputs need the fused target features."""
    return bool(cfg.drafter) and read_drafter(cfg.drafter).family.name == "eagle3"


ROUTER = Recipe(
    name="coral-router", family="coral", preset=RouterConfig(), build=_build, loss=_loss, export=_export,
    finish=_finish, aux_features=_reads_aux, loop_defaults=dict(lr=1e-3, warmup_steps=20, batch_tokens=2048, save_every=100, grad_clip=None),
    help="CORAL's LM-head router on a frozen drafter: one checkpoint per partition x N x k",
)

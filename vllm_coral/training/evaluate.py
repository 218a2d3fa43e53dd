"""Held-out scoring of a drafter with its recipe's own loss: the offline numbers of a recipe study.

Every recipe's loss already reports what matters per unrolled step (``acc/top1_step{j}``:
how often the drafter's top token equals the target's at drafting step j, the best
offline proxy for vLLM's per-position acceptance at T=0, and the loss terms). Scoring
held-out features runs that same function with the module in eval mode (recipes add no
noise then) and without gradients, over every held-out sequence once, in file order, and
averages each term weighted by the tokens the batch scores.

The training loop calls it for ``--heldout-features`` (every ``--eval-every`` steps and at
the end; ``heldout.json`` in the run folder).
"""

from __future__ import annotations

import torch

from vllm_coral.training.dataset import FeatureDataset, token_batches

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(recipe, cfg, module: torch.nn.Module, head, features, *, max_seq_len: int = 1024,
             batch_tokens: int = 4096, device: torch.device | None = None, autocast=None,
             max_batches: int | None = None) -> dict:  # fmt: skip
    """{term: token-weighted mean over the held-out features} plus ``tokens`` scored."""
    data = FeatureDataset(features, max_seq_len, head.hidden_size, aux=recipe.uses_aux(cfg),
                          text_ok=recipe.reads_text(cfg))
    batches = token_batches(data.lengths(), batch_tokens, list(range(len(data))))[:max_batches]
    device = device or next(module.parameters()).device
    was_training = module.training
    module.eval()
    sums: dict[str, float] = {}
    scored = 0.0
    try:
        for indices in batches:
            batch = data.collate(indices, torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad(), autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                _, terms = recipe.loss(cfg, module, head, batch)
            n = float(batch.mask[:, 2:].sum())  # tokens x_{t+2} the batch scores
            scored += n
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value * n
    finally:
        module.train(was_training)
    return {**{k: v / max(scored, 1.0) for k, v in sums.items()}, "tokens": int(scored)}

"""Offline top-1 of a drafter on feature sets, to set beside what vLLM accepts (the gap check).

    .venv/bin/python benchmarks/results/recipe-study-12k/gap_check.py checkpoints/smollm2-135m/eagle-12k eagle \
        features/eval128/mt_bench/train features/eval128-bf16/mt_bench/train

Prints, per features folder, the scored tokens and top-1 at drafting steps 1-5 (the recipe's
own loss unrolled to 5 steps, as ``benchmarks/recipe_study.py`` scores its rows).
"""

import sys
from dataclasses import replace

from vllm_coral.models.registry import load_drafter
from vllm_coral.models.target import TargetHead
from vllm_coral.models.targets import fetch_target
from vllm_coral.training.evaluate import evaluate
from vllm_coral.training.recipes import get_recipe

ckpt, recipe_name, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
head = TargetHead.load(fetch_target(progress=False))
module, _ = load_drafter(ckpt, head.config)
recipe = get_recipe(recipe_name)
cfg = replace(recipe.preset, unroll=5)
cfg = replace(cfg, topk=None) if hasattr(cfg, "topk") else cfg
for features in sets:
    r = evaluate(recipe, cfg, module, head, features)
    print(features, r["tokens"], [round(r[f"acc/top1_step{j}"], 3) for j in range(1, 6)], flush=True)

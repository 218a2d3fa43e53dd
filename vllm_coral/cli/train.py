"""``vllm-coral train <recipe>``: one subcommand per registered recipe, flags from its configs.

    vllm-coral train eagle --features features/smol/train --out runs/eagle --epochs 2
    vllm-coral train hass  --features features/smol/train --out runs/hass --device cuda
    vllm-coral train coral --features features/smol/train --out runs/coral --csra-weight 0.2
    vllm-coral train coral-router --drafter runs/coral/drafter --features features/smol/train \\
        --heldout-features features/smol/heldout --out runs/router --partitions frequency kmeans
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vllm_coral.cli.flags import add_config_flags, config_from_args

__all__ = ["add_train_commands"]


def add_train_commands(sub) -> None:
    from vllm_coral.training.loop import LoopConfig
    from vllm_coral.training.recipes import recipes

    trainp = sub.add_parser("train", help="train a drafter (one subcommand per recipe)")
    by_recipe = trainp.add_subparsers(dest="recipe", required=True)
    for name, recipe in recipes().items():
        t = by_recipe.add_parser(name, help=recipe.help, description=recipe.help)
        t.add_argument("--target", default="smollm2-135m", help="embedded target name or a checkpoint folder")
        t.add_argument("--features", type=Path, required=True, help="features folder of the train split")
        t.add_argument("--out", type=Path, required=True, help="run folder; checkpoints land under it")
        t.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
        t.add_argument("--heldout-features", type=Path, default=None,
                       help="features of the held-out split: scored with the recipe's loss (heldout.json)")
        recipe_flags = t.add_argument_group(f"{name} recipe")
        add_config_flags(recipe_flags, recipe.config_cls, recipe.preset, dest="recipe")
        loop_flags = t.add_argument_group("training loop")
        add_config_flags(loop_flags, LoopConfig, LoopConfig(**recipe.loop_defaults), dest="loop")
        t.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from vllm_coral.cli import resolve_target
    from vllm_coral.training.loop import LoopConfig, run
    from vllm_coral.training.recipes import get_recipe

    recipe = get_recipe(args.recipe)
    cfg = config_from_args(args, recipe.preset, dest="recipe")
    loop = config_from_args(args, LoopConfig(**recipe.loop_defaults), dest="loop")
    target = resolve_target(args.target)
    meta = dict(target=args.target, features=str(args.features))
    summary = run(recipe, cfg, loop, target, args.features, args.out, resume=args.resume, meta=meta,
                  heldout=args.heldout_features)
    if int(os.environ.get("RANK", "0")) == 0:
        for key, m in summary.get("heldout", {}).items():
            print(f"{key}: held-out mass {m['mass']:.3f}, target top-1 in groups {m['target_top1']:.3f}, "
                  f"greedy draft kept {m['draft_top1']:.3f}")  # fmt: skip
        if "eval" in summary:
            tops = {k.split("_")[-1]: v for k, v in summary["eval"].items() if k.startswith("acc/top1")}
            print("held-out top-1: " + ", ".join(f"{k} {v:.3f}" for k, v in tops.items()))
        for path in summary["checkpoints"]:
            print(f"drafter: {path}")
        print(f"{args.out}: {summary['steps']} steps on {summary['device']}, {summary['seconds']:.0f} s, "
              f"{summary['tokens_per_second']:.0f} tokens/s")  # fmt: skip
    return 0

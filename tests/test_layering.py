"""The package layers import downward only, and only vllm_coral.plugin imports vLLM.

Contracts live in pyproject.toml ([tool.importlinter]) and are checked by import-linter.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(config), "--no-cache"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_import_contracts_hold():
    proc = _lint(ROOT / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken" in proc.stdout


def test_import_contracts_can_fail(tmp_path):
    """The same checker, given the layers upside down, must report a broken contract
    (cli imports models, which the inverted order forbids)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"layers = \[\n(.*?)\n\]", text, re.S)
    layers = block.group(1).splitlines()
    inverted = text.replace(block.group(1), "\n".join(reversed(layers)))
    config = tmp_path / "pyproject.toml"
    config.write_text(inverted)
    proc = _lint(config)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout


def test_light_imports_do_not_import_vllm():
    code = (
        "import sys, vllm_coral, vllm_coral.training, vllm_coral.kernels, "
        "vllm_coral.models.targets, vllm_coral.plugin, vllm_coral.cli\n"
        "heavy = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

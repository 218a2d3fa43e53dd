"""Committed results, checkpoints and datasets name no path of the machine they were made on
(the guide: no absolute machine paths in anything committed)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A JSON/markdown/text value that starts at the root of a dev or CI machine's file system.
ABSOLUTE = re.compile(r"""(?:^|["'`(\s=])/(?:work|root|tmp|home|Users|opt/[a-z]+/\.cache)/""")


def _committed(*folders: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z", *folders], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p.endswith((".json", ".md", ".txt", ".log", ".sh"))]


def test_no_absolute_machine_paths_in_committed_results():
    files = _committed("benchmarks/results", "checkpoints", "datasets")
    assert files, "no committed results found"
    bad = [f"{p.relative_to(ROOT)}:{n}" for p in files for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
           if ABSOLUTE.search(line)]  # fmt: skip
    assert not bad, f"absolute machine paths in committed files: {bad[:10]}"


def test_the_check_catches_what_it_should():
    assert ABSOLUTE.search('"features": "/tmp/exp/feats/train"')
    assert ABSOLUTE.search("wrote /work/data/abl/out/recipe_study.json")
    assert not ABSOLUTE.search('"features": "feats/train"') and not ABSOLUTE.search("see ../../gpu/check.sh")

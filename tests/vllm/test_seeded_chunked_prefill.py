"""The ``seeded_chunked_prefill`` CPU patch (``vllm_coral/plugin/patches.py``) in real vLLM:
seeded T=1 requests whose prompts are chunked run, and draw exactly the tokens they draw
unchunked; without the patch the engine dies (the upstream bug this patch works around;
once this assertion fails upstream has fixed it, and the patch can go)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = """
import json, sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model, chunked = sys.argv[1], sys.argv[2] == "chunked"
    llm = LLM(model=model, dtype="float32", max_model_len=2048, seed=0, enforce_eager=True,
              enable_chunked_prefill=chunked, max_num_batched_tokens=256 if chunked else 2048)
    prompts = ["apple " * 700 + "How many apples?", "plum " * 500 + "Count the plums.", "Say hi."]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True) for s in (11, 12, 13)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def _run(tmp_path, target_path, mode, **env):
    script = tmp_path / "seeded.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(target_path), mode], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
    return proc, (json.loads(lines[-1][7:]) if lines else None)


def test_seeded_requests_draw_the_same_tokens_chunked_or_not(target_path, tmp_path):
    proc, chunked = _run(tmp_path, target_path, "chunked")
    assert chunked is not None, proc.stderr[-3000:]
    proc, whole = _run(tmp_path, target_path, "whole")
    assert whole is not None, proc.stderr[-3000:]
    assert [len(t) for t in chunked] == [12, 12, 12]
    assert chunked == whole


def test_upstream_cpu_generators_refuse_the_rewind(target_path, tmp_path):
    proc, tokens = _run(tmp_path, target_path, "chunked", VLLM_CORAL_DISABLE_PATCHES="seeded_chunked_prefill")
    assert tokens is None and "does not use offset" in proc.stderr + proc.stdout

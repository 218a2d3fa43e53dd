"""The demo: the embedded default target served by real vLLM, with and without speculation.

It fetches (once) the SmolLM2-135M-Instruct target, then, in one invocation and on the
same chat prompts at T=0:

1. ``target``: vLLM with no speculation (the baseline for speedup and for outputs);
2. ``draft_model (self)``: vLLM's built-in ``draft_model`` method with the target as its
   own drafter. Every draft must be accepted (per-position acceptance 1.0), so this row
   checks the acceptance accounting end to end; it is *slower* than the target alone
   because the drafter costs as much as the target;
3. each drafter committed under ``checkpoints/<target>/`` (EAGLE and HASS baselines and the
   CORAL drafter with its LM-head router, trained by ``vllm-coral train``), served by vLLM's
   ``eagle`` method (CORAL through the plugin's routed-head drafter class).

and prints a table (tokens/s, speedup, τ, acceptance per position, and whether every
output is token-identical to the target's), writing the same numbers to JSON.

It runs in float32 by default. In bfloat16, verifying k+1 tokens in one forward rounds
differently from decoding them one at a time, and on SmolLM2 one of the four default
prompts then diverges from the target-alone output (measured: 3/4 identical in bf16, 4/4
in fp32). ``--dtype bfloat16`` shows it; the identical column reports it, never hides it.
Trained drafters of later methods join this table as they land.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from vllm_coral.models.targets import fetch_target
from vllm_coral.workflows.evaluate import MethodResult, compare_methods, drafter_spec, format_table

__all__ = ["DEFAULT_PROMPTS", "format_table", "load_questions", "run_demo"]

DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue.",
    "Give me a Python function that returns the n-th Fibonacci number.",
    "What are three tips for staying focused while studying?",
]


def load_questions(path: Path, limit: int) -> list[str]:
    """First user turns of a question file (MT-bench, ShareGPT or OpenAI-messages form).

    Parsing is ``vllm_coral.training.data.read_prompts``: malformed lines are skipped and
    reported on stderr with their line numbers, the readable ones are kept (a file with no
    usable question at all raises ValueError).
    """
    from vllm_coral.training.data import ParseReport, read_prompts

    report = ParseReport()
    prompts = read_prompts(path, report)
    if report.skipped:
        print(f"{path}: {report.summary()}", file=sys.stderr)
    return [p.turns[0] for p in prompts[:limit]]


# Small trained drafters committed with the repository (EAGLE format, served by plain vLLM).
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def committed_drafters(target: str) -> dict[str, Path]:
    """name -> checkpoint folder of the drafters trained for ``target`` that ship here."""
    folder = CHECKPOINTS / target
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").is_file()}


def run_demo(
    *,
    target: str = "smollm2-135m",
    num_speculative_tokens: int = 3,
    max_tokens: int = 128,
    prompts: list[str] | None = None,
    dtype: str = "float32",
    out: Path | None = None,
) -> list[MethodResult]:
    model = fetch_target(target)
    print(f"target: {model}", file=sys.stderr)
    conversations = [[{"role": "user", "content": p}] for p in (prompts or DEFAULT_PROMPTS)]
    methods = [
        ("target", None),
        (
            "draft_model (self)",
            {"method": "draft_model", "model": str(model), "num_speculative_tokens": num_speculative_tokens},
        ),
    ]
    for name, ckpt in committed_drafters(target).items():
        methods.append((name, drafter_spec(ckpt, num_speculative_tokens)))
    results = compare_methods(
        model, methods, conversations, max_tokens=max_tokens, dtype=dtype,
        progress=lambda msg: print(msg, file=sys.stderr),
    )  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "target": target,
            "model_path": str(model),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
            "results": [r.__dict__ for r in results],
        }
        (out / "demo.json").write_text(json.dumps(payload, indent=2) + "\n")
        (out / "demo.md").write_text(format_table(results) + "\n")
    return results

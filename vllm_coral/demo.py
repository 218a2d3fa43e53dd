"""The demo: the embedded default target served by real vLLM, with and without speculation.

It fetches (once) the SmolLM2-135M-Instruct target, then, in one invocation and on the
same chat prompts at T=0:

1. ``target``: vLLM with no speculation (the baseline for speedup and for outputs);
2. ``draft_model (self)``: vLLM's built-in ``draft_model`` method with the target as its
   own drafter. Every draft must be accepted (per-position acceptance 1.0), so this row
   checks the acceptance accounting end to end; it is no faster than the target alone
   (the drafter costs as much as the target; only vLLM's per-step overhead is shared);
3. ``ngram``: vLLM's prompt-lookup drafter, the free baseline a trained drafter must beat,
   and
4. the drafters the reference benchmark compares (``benchmarks/configs/<target>.json``, the
   one list of shipped drafters: the tier (b) product, the EAGLE-2 / HASS / CORAL / EAGLE-3
   retrains on the 12K set, and the families not retrained yet), served by vLLM's ``eagle``
   or ``eagle3`` method (CORAL, CORAL-3 and FSPAD through the plugin's drafter classes) and
   the small-LM drafter by vLLM's own ``draft_model`` method. Other folders under
   ``checkpoints/<target>/`` are history (the drafters they replaced), served by nothing
   unless named.

and prints a table (tokens/s, speedup, τ, acceptance per position, and whether every
output is token-identical to the target's), writing the same numbers to JSON. Requests run
one at a time (batch 1, as the papers measure speedups), and each method's pass runs three
times, each beside a pass of the target alone, so the speedup is a median of paired ratios
with its min-max rather than one run on a possibly busy machine.

It runs in float32 by default. In bfloat16, verifying k+1 tokens in one forward rounds
differently from decoding them one at a time, and on SmolLM2 one of the four default
prompts then diverges from the target-alone output (measured: 3/4 identical in bf16, 4/4
in fp32). ``--dtype bfloat16`` shows it; the identical column reports it, never hides it.
Trained drafters of later methods join this table as they land.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vllm_coral.models.checkpoint import read_config
from vllm_coral.models.targets import fetch_target
from vllm_coral.plugin.engine import quiet_vllm_logs
from vllm_coral.prompts import Prompt
from vllm_coral.workflows.bench.methods import load_methods_file, resolve_methods
from vllm_coral.workflows.bench.offline import OfflineRow, run_offline
from vllm_coral.workflows.bench.report import aggregate_repeats, identical_text, run_metadata, speedup_text, write_run
from vllm_coral.workflows.install import pip_install

__all__ = ["DEFAULT_PROMPTS", "committed_drafters", "format_table", "run_demo", "shipped_methods"]

DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue.",
    "Give me a Python function that returns the n-th Fibonacci number.",
    "What are three tips for staying focused while studying?",
]

# Small trained drafters committed with the repository, and the method rows that serve them.
CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"


def committed_drafters(target: str) -> dict[str, Path]:
    """row label (the folder name) -> checkpoint folder of every drafter committed for
    ``target``, history included; what each one is comes from its config.json. The ones the demo serves are :func:`shipped_methods`."""
    folder = CHECKPOINTS / target
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").is_file()}


def shipped_methods(target: str) -> tuple[list[dict], Path]:
    """(method rows, the folder their paths are relative to) of the drafters shipped for
    ``target``: the reference benchmark's methods file, less the target row (callers add it).
    No file for ``target``: no rows (the built-in methods still run)."""
    path = METHOD_CONFIGS / f"{target}.json"
    if not path.is_file():
        return [], Path.cwd()
    entries, _, base_dir = load_methods_file(path)
    return [e for e in entries if not (isinstance(e, dict) and e.get("method") == "none")], base_dir


def run_demo(
    *,
    target: str = "smollm2-135m",
    num_speculative_tokens: int = 3,
    max_tokens: int = 128,
    prompts: list[Prompt] | None = None,
    dtype: str = "float32",
    batch_size: int | None = 1,
    repeats: int = 3,
    out: Path | None = None,
) -> list[OfflineRow]:
    """The demo's rows: one vLLM engine per method, T=0, one request at a time by default
    (``batch_size`` None: all prompts in one call), every method's pass ``repeats`` times,
    each paired with a target pass (see :mod:`vllm_coral.workflows.bench.offline`)."""
    quiet_vllm_logs()
    model = fetch_target(target, installer=pip_install)
    print(f"target: {model}", file=sys.stderr)
    entries = [
        {"name": "target", "method": "none"},
        {"name": "draft_model (self)", "method": "draft_model", "model": str(model)},
    ]
    shipped, base_dir = shipped_methods(target)  # ngram first, then the trained drafters
    entries += shipped
    specs = resolve_methods(entries, target_config=read_config(model), default_k=num_speculative_tokens,
                            base_dir=base_dir)  # fmt: skip
    if prompts is None:
        prompts = [Prompt(id=f"demo/{i}", turns=(p,)) for i, p in enumerate(DEFAULT_PROMPTS)]
    meta = run_metadata()
    rows = run_offline(model, specs, {"demo": prompts}, temperatures=[0.0], draft_sample_methods=["greedy"],
                       max_tokens=max_tokens, batch_size=batch_size, dtype=dtype, repeats=repeats,
                       log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    if out is not None:
        config = {"target": target, "max_tokens": max_tokens, "k": num_speculative_tokens, "dtype": dtype,
                  "batch_size": batch_size, "repeats": repeats, "methods": entries}  # fmt: skip
        write_run(out, "offline", rows, config, meta)
    return rows


def format_table(rows: list[OfflineRow]) -> str:
    """The demo's compact table, repeats merged (the full one is ``bench_offline.md`` with ``--out``)."""
    header = "| method | startup s | tok/s | speedup, median [min-max] | τ | acceptance per position | identical to target |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in aggregate_repeats([r.to_dict() for r in rows]):
        if r.get("error"):
            lines.append(f"| {r['method']} | - | - | - | - | - | error: {r['error']} |")
            continue
        tau = f"{r['mean_acceptance_length']:.2f}" if r.get("mean_acceptance_length") is not None else "-"
        acc = " ".join(f"{a:.2f}" for a in r.get("acceptance_per_position") or []) or "-"
        lines.append(f"| {r['method']} | {r['startup_s']:.1f} | {r['tokens_per_second']:.1f} | {speedup_text(r)} | {tau} "
                     f"| {acc} | {identical_text(r)} |")  # fmt: skip
    return "\n".join(lines)

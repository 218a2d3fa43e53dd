"""What one decode step of a small-LM drafter costs next to the target's, at batch 1 in vLLM.

    python benchmarks/bench_small_lm_step.py --out benchmarks/results/cpu-dev     # ~6 min here
    python benchmarks/bench_small_lm_step.py --preset smoke --out /tmp/step       # ~1 min

Each shape is a ``vllm_coral.models.small_lm`` checkpoint (random weights: step time does
not depend on them) served by vLLM **as a model of its own**, generating ``--tokens``
tokens greedily for one request (``ignore_eos``) after a warm-up request; the target is
measured the same way, first and last, so a drift of the machine shows. ms per token of a
standalone decode step includes vLLM's per-step scheduling, which the drafting steps
inside speculative decoding skip, so the drafter's share here is an upper bound.

Why it matters: with k drafts per verification, speculative decoding at batch 1 pays about
k drafter steps + one target step (verifying k+1 tokens costs about one step on a CPU at
batch 1) per τ tokens, so the speedup is about τ / (1 + k c) with c the drafter/target
step ratio: c = 0.25 at k = 3 needs τ > 1.75 just to break even.

Writes ``small_lm_step.json`` (machine, versions, every repeat), ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, git_sha, now_utc, write_outputs  # noqa: E402

# (layers, width) of the drafters timed; the target's MLP width and heads throughout.
SHAPES = {"full": [(1, 576), (2, 576), (4, 576), (2, 288), (4, 288)], "smoke": [(1, 288)]}


def _drafter_folder(target: Path, layers: int, width: int, root: Path) -> tuple[Path, int]:
    """A random-weight checkpoint of the shape with the target's tokenizer; (folder, parameters)."""
    import torch

    from vllm_coral.models.small_lm import SmallLMConfig, SmallLMDrafter, save_small_lm

    torch.manual_seed(0)
    config = SmallLMConfig.from_target(json.loads((target / "config.json").read_text()), num_hidden_layers=layers,
                                       hidden_size=width)  # fmt: skip
    folder = save_small_lm(SmallLMDrafter(config), root / f"l{layers}-h{width}", target)
    return folder, sum(math.prod(shape) for shape, _ in config.tensor_specs().values())


def _ms_per_token(model: Path, tokens: int, repeats: int) -> list[float]:
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm

    prompt = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    times = []
    with open_llm(**engine_kwargs(model, dtype="float32")) as llm:
        llm.chat(prompt, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = llm.chat(prompt, params, use_tqdm=False)[0].outputs[0]
            times.append(1e3 * (time.perf_counter() - start) / len(out.token_ids))
    return times


def run(target: Path, shapes: list[tuple[int, int]], tokens: int, repeats: int) -> dict:
    rows = [{"name": "target (first)", "layers": None, "width": None, "ms": _ms_per_token(target, tokens, repeats)}]
    with tempfile.TemporaryDirectory() as tmp:
        for layers, width in shapes:
            folder, params = _drafter_folder(target, layers, width, Path(tmp))
            rows.append({"name": f"{layers} layers x {width}", "layers": layers, "width": width, "params": params,
                         "ms": _ms_per_token(folder, tokens, repeats)})  # fmt: skip
    rows.append({"name": "target (last)", "layers": None, "width": None, "ms": _ms_per_token(target, tokens, repeats)})
    target_ms = statistics.median(rows[0]["ms"] + rows[-1]["ms"])
    for row in rows:
        row["median_ms"] = statistics.median(row["ms"])
        row["ratio"] = row["median_ms"] / target_ms
    return {"device": device_name("cpu"), "git": git_sha(), "date": now_utc(), "tokens": tokens, "repeats": repeats,
            "target_ms": target_ms, "rows": rows}  # fmt: skip


def to_markdown(result: dict) -> str:
    lines = [f"# Small-LM drafter decode step vs the target, batch 1, vLLM fp32 ({result['device']})", "",
             f"{result['tokens']} greedy tokens per request, {result['repeats']} repeats (median, min-max); "
             "each model served alone, so the drafter share is an upper bound.", "",
             "| model | parameters | ms/token | share of a target step |", "|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        params = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "134.5M"
        lines.append(f"| {r['name']} | {params} | {r['median_ms']:.1f} ({min(r['ms']):.1f}-{max(r['ms']):.1f}) "
                     f"| {r['ratio']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["name"] for r in rows], [r["median_ms"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.plot(r["ms"], [i] * len(r["ms"]), "k.", ms=4)
        ax.text(r["median_ms"], i, f" {r['ratio']:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("ms per decode step, batch 1 (vLLM, fp32)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m", help="embedded target name or a model folder")
    parser.add_argument("--preset", choices=sorted(SHAPES), default="full")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per request (default: 96, smoke 16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from vllm_coral.cli import resolve_target

    tokens = args.tokens or (16 if args.preset == "smoke" else 96)
    result = run(Path(resolve_target(args.target)), SHAPES[args.preset], tokens, args.repeats)
    write_outputs(args.out, "small_lm_step", result, to_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

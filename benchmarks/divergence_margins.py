"""Replay the T=0 divergences a benchmark run found: how close was the target's choice?

For every mismatch recorded by the correctness guard (``bench_offline.json``), rebuild the
context where the two outputs part (the request's prompt tokens + the target-alone output
before that position), run the target once with transformers in float32, and report the
two best next tokens and their logit gap, and where the speculative run's token ranks.

A gap that is tiny compared with the rounding error of the run's dtype means the
divergence is floating point (verifying k+1 positions in one forward sums in another
order than decoding one token at a time), not a bug: the speculative run picked the
runner-up of a near-tie. A large gap would be a real bug.

    .venv/bin/python benchmarks/divergence_margins.py RUN_DIR/bench_offline.json --out RUN_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_outputs  # noqa: E402


def margins(run: dict, model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cases = []
    for row in run["rows"]:
        mismatches = (row.get("guard") or {}).get("mismatches", [])
        differed = {m["request"] for m in mismatches}
        for m in mismatches:
            if m.get("context_token_ids") is None or m["expected"] is None or m["got"] is None:
                continue
            ctx = m["context_token_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ctx])).logits[0, -1].float()
            top = torch.topk(logits, 2)
            cases.append({
                "dataset": row["dataset"], "method": row["method"], "request": m["request"],
                "position": m["position"], "expected": m["expected"], "got": m["got"],
                "top1": int(top.indices[0]), "top2": int(top.indices[1]),
                "gap_top1_top2": float(top.values[0] - top.values[1]),
                "gap_expected_got": float(logits[m["expected"]] - logits[m["got"]]),
                "got_rank": int((logits > logits[m["got"]]).sum()),
                "inherited": _earlier_turn(m["request"]) in differed,
            })  # fmt: skip
    return {"dtype": run["config"].get("dtype"), "cases": cases}


def _earlier_turn(request: str) -> str:
    """'81/turn2' -> '81/turn1': a later turn's prompt holds the run's own earlier answer,
    so once an earlier turn differed, the replay context (the target's) is not the one
    the speculative run saw."""
    qid, _, turn = request.rpartition("/turn")
    return f"{qid}/turn{int(turn) - 1}" if turn.isdigit() else ""


def to_markdown(result: dict) -> str:
    first = [c for c in result["cases"] if not c["inherited"]]
    lines = [f"Run dtype: {result['dtype']}; logits replayed in float32 with transformers. "
             f"{len(first)} first divergences (the others follow a divergence in an earlier turn of the same "
             "conversation, so their replay context is not what the speculative run saw)"
             + (f"; largest |expected − got| logit gap among them: {max(abs(c['gap_expected_got']) for c in first):.4f}; "
                f"the speculative token is the fp32 argmax in {sum(c['got_rank'] == 0 for c in first)}."
                if first else ".") + "\n",
             "| dataset | method | request | position | target token | spec token | top-1 − top-2 logit gap "
             "| expected − got gap | spec token rank | after an earlier divergence |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["cases"]:
        lines.append(f"| {c['dataset']} | {c['method']} | {c['request']} | {c['position']} | {c['expected']} | {c['got']} "
                     f"| {c['gap_top1_top2']:.4f} | {c['gap_expected_got']:.4f} | {c['got_rank']} "
                     f"| {'yes' if c['inherited'] else 'no'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for inherited, color, label in ((False, "tab:red", "first divergence"), (True, "tab:grey", "after an earlier one")):
        gaps = [abs(c["gap_expected_got"]) for c in result["cases"] if c["inherited"] == inherited]
        if gaps:
            ax.hist(gaps, bins=20, color=color, alpha=0.8, label=label)
    ax.legend(fontsize=8)
    ax.set_xlabel("|logit(target token) − logit(spec token)| at the divergence (fp32)")
    ax.set_ylabel("divergences")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="bench_offline.json")
    parser.add_argument("--target", default="smollm2-135m", help="embedded target name or model folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from vllm_coral.models.targets import TARGETS, fetch_target
    from vllm_coral.workflows.install import pip_install

    run = json.loads(args.run.read_text())
    model_dir = fetch_target(args.target, installer=pip_install) if args.target in TARGETS else Path(args.target)
    result = margins(run, model_dir)
    if not result["cases"]:
        print("no T=0 mismatches with replayable context in this run")
        return 0
    write_outputs(args.out, "divergence_margins", result, to_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

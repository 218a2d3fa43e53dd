"""Where the time of a decode step goes, per method: the report's step-cost and phase tables
and ``phases.png``.

Two views of the same question (why a method with τ > 1 can still be slower than the
target alone):

- :func:`step_cost`, from vLLM's counters and tokens/s: what one speculative step costs in
  target-alone steps, i.e. the τ a method needs to break even;
- :func:`step_phases`, from the engine's phase timer (:mod:`vllm_coral.plugin.phases`):
  the wall-clock time of the generate calls split into the target's forward and LM head
  (at a speculative step: the verification of k+1 tokens), the drafter (all k draft
  positions), sampling and verification (the rejection sampler), the model runner's
  other work (inputs, attention metadata, bookkeeping), and the rest outside the runner
  (scheduler, inter-process messages, detokenizing, the frontend): generate seconds minus
  the timed phases. Offline rows only (``vllm serve`` runs in its own process).

A step here is an engine step: one target forward for the whole batch (at batch 1, one
request's step, emitting 1 + the accepted draft tokens).
"""

from __future__ import annotations

from pathlib import Path

from vllm_coral.workflows.bench.plots import pyplot, row_label

__all__ = ["PHASE_GROUPS", "format_phases", "format_step_cost", "plot_phases", "step_cost", "step_phases"]

# Report column -> the vLLM model-runner phases it sums (vllm_coral.plugin.phases.PHASES).
PHASE_GROUPS = {
    "target": ("forward", "postprocess"),
    "drafter": ("draft",),
    "sample/verify": ("sample",),
    "runner other": ("preprocess", "bookkeep", "other"),
}
OUTSIDE = "outside runner"


def step_cost(r: dict) -> dict | None:
    """Per-request decode steps of a speculative row, from its counters and output tokens.

    Every step of a request emits 1 + (drafts accepted) tokens, so steps = tokens -
    accepted, τ over all steps = tokens / steps (steps without a draft count, unlike τ),
    and a step costs ``τ_all / speedup`` target-alone steps: the τ the method needs to
    break even. Worked example: 100 tokens, 25 accepted, 60 drafts -> 75 steps, 80% of
    them drafted, τ_all 1.33; at 0.67x a step costs 2.0 target steps.
    """
    c = r.get("spec_counters")
    if not c or r.get("error") or not r.get("speedup") or r["kind"] == "none":
        return None
    steps = r["output_tokens"] - c["num_accepted_tokens"]
    if steps <= 0:
        return None
    tau_all = r["output_tokens"] / steps
    return {"steps": steps, "drafted": c["num_drafts"] / steps, "tau_all": tau_all, "cost": tau_all / r["speedup"]}


def format_step_cost(rows: list[dict]) -> str:
    lines = []
    for r in sorted((r for r in rows if r["temperature"] == 0.0), key=lambda r: r["dataset"]):
        sc = step_cost(r)
        if sc:
            lines.append(f"| {r['dataset']} | {r['method']} | {sc['drafted']:.0%} | {sc['tau_all']:.2f} "
                         f"| {r['speedup']:.2f}x | {sc['cost']:.2f} |")  # fmt: skip
    if not lines:
        return ""
    head = ("| dataset | method | steps with a draft | τ over all steps | speedup | step cost in target steps "
            "(= τ to break even) |\n|---|---|---|---|---|---|")  # fmt: skip
    return head + "\n" + "\n".join(lines) + "\n"


def step_phases(r: dict) -> dict | None:
    """A row's engine time per phase group: {"steps", "tokens", "seconds": {group: s}}
    (the groups of :data:`PHASE_GROUPS` and ``outside runner``); None without phases.
    Worked example: 2.0 s of generate calls, 100 steps, forward 1.2 s + postprocess 0.1 s,
    draft 0.4 s, the rest 0.2 s -> target 13 ms, drafter 4 ms, outside 1 ms per step."""
    ph = r.get("phases")
    if not ph or r.get("error") or not ph.get("steps"):
        return None
    sec = ph["seconds"]
    groups = {name: sum(sec.get(p, 0.0) for p in parts) for name, parts in PHASE_GROUPS.items()}
    groups[OUTSIDE] = max(r["seconds"] - sum(sec.values()), 0.0)
    return {"steps": ph["steps"], "tokens": r["output_tokens"], "seconds": groups}


def format_phases(rows: list[dict]) -> str:
    """Milliseconds per engine step by phase group, and per output token (of all requests),
    at T=0."""
    lines = []
    for r in sorted((r for r in rows if r["temperature"] == 0.0), key=lambda r: r["dataset"]):
        sp = step_phases(r)
        if sp is None:
            continue
        ms = {k: 1000 * v / sp["steps"] for k, v in sp["seconds"].items()}
        total = sum(sp["seconds"].values())
        lines.append(f"| {r['dataset']} | {r['method']} | {sp['steps']} | {sp['tokens'] / sp['steps']:.2f} | "
                     + " | ".join(f"{v:.2f}" for v in ms.values())
                     + f" | {1000 * total / sp['steps']:.2f} | {1000 * total / max(sp['tokens'], 1):.2f} |")  # fmt: skip
    if not lines:
        return ""
    names = [*PHASE_GROUPS, OUTSIDE]
    head = ("| dataset | method | steps | tokens per step | " + " | ".join(f"{n} ms/step" for n in names)
            + " | total ms/step | ms per output token |\n" + "|---" * (len(names) + 6) + "|")  # fmt: skip
    return "\nEngine time per decode step, by phase (sums over the repeats):\n\n" + head + "\n" + "\n".join(lines) + "\n"


def plot_phases(rows: list[dict], path: Path) -> bool:
    """Stacked bars: milliseconds per output token by phase group, one bar per (dataset,
    method) at T=0."""
    bars = [(f"{r['dataset']} · {row_label(r)}", step_phases(r)) for r in rows if r["temperature"] == 0.0]
    bars = [(label, sp) for label, sp in bars if sp is not None]
    if not bars:
        return False
    plt = pyplot()
    names = [*PHASE_GROUPS, OUTSIDE]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(bars) + 1.6))
    left = [0.0] * len(bars)
    for name in names:
        vals = [1000 * sp["seconds"][name] / max(sp["tokens"], 1) for _, sp in bars]
        ax.barh(range(len(bars)), vals, left=left, label=name)
        left = [a + b for a, b in zip(left, vals)]
    for i, total in enumerate(left):
        ax.annotate(f"{total:.1f}", (total, i), va="center", fontsize=7, xytext=(2, 0), textcoords="offset points")
    ax.set_yticks(range(len(bars)), [label for label, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per output token (T=0)")
    ax.legend(fontsize=7, ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / len(bars)))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

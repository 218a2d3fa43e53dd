"""Compare speculative-decoding methods on one target, through real vLLM, in one process.

Every method (the target alone first, then each speculative config) gets a fresh engine,
runs the same conversations as one batch at the same sampling settings, and reports:
tokens/s, speedup over the target alone measured in the same invocation, τ and
per-position acceptance from vLLM's own metrics, and, at T=0, how many outputs are
token-identical to the target's (a mismatch is reported, never hidden).

``vllm-coral eval`` drives this for trained drafters on MT-bench-format questions and/or a
held-out split written by ``data generate``; the demo uses it for its table.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["MethodResult", "compare_methods", "drafter_spec", "format_table", "heldout_conversations", "plot_acceptance",
           "plot_speedup"]


@dataclass
class MethodResult:
    name: str
    speculative_config: dict | None
    startup_s: float
    tokens: int
    seconds: float
    tokens_per_second: float
    speedup: float
    mean_acceptance_length: float | None
    acceptance_per_position: list[float]
    draft_acceptance_rate: float | None
    # How many outputs are token-identical to the target's (None for the target itself).
    identical: int | None
    num_prompts: int


def drafter_spec(
    path: str | Path,
    num_speculative_tokens: int,
    *,
    target_config: dict | None = None,
    draft_sample_method: str | None = None,
) -> dict:
    """vLLM's speculative config for one of our drafter checkpoints, after validating it.

    The checkpoint is loaded by its family's loader first (EAGLE/HASS or CORAL), so a bad
    one fails here with one line instead of deep inside a vLLM worker. CORAL checkpoints
    also get ``use_local_argmax_reduction``: greedy drafting then takes the routed top-1
    directly (``get_top_tokens``) instead of argmax over full-vocabulary logits.
    """
    from vllm_coral.models.checkpoint import read_config
    from vllm_coral.models.coral import CoralDrafter
    from vllm_coral.models.eagle import EagleDrafter

    path = Path(path).resolve()
    family = (read_config(path).get("vllm_coral") or {}).get("family")
    loader = CoralDrafter if family == "coral" else EagleDrafter
    loader.load(path, target_config=target_config)
    spec = {"method": "eagle", "model": str(path), "num_speculative_tokens": num_speculative_tokens}
    if family == "coral":
        spec["use_local_argmax_reduction"] = True
    if draft_sample_method is not None:
        spec["draft_sample_method"] = draft_sample_method
    return spec


def compare_methods(
    model: str | Path,
    methods: list[tuple[str, dict | None]],
    conversations: list[list[dict]],
    *,
    temperature: float = 0.0,
    max_tokens: int = 128,
    dtype: str = "float32",
    seed: int = 0,
    batch_size: int | None = None,
    progress=None,
) -> list[MethodResult]:
    """Run each (name, speculative_config) on the conversations; the first must be None."""
    from vllm import SamplingParams

    from vllm_coral.plugin.engine import engine_kwargs, open_llm, timed_chat

    if not methods or methods[0][1] is not None:
        raise ValueError("the first method must be the target alone (speculative_config None)")
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
    results: list[MethodResult] = []
    reference = None
    base_tps = None
    for name, spec in methods:
        if progress:
            progress(f"running {name} ...")
        with open_llm(**engine_kwargs(model, speculative_config=spec, dtype=dtype, seed=seed)) as llm:
            run = timed_chat(llm, conversations, params, batch_size=batch_size)
            startup = llm.vllm_coral_startup_s
        if reference is None:
            reference, base_tps = run.token_ids, run.tokens_per_second
        identical = None if spec is None else sum(a == b for a, b in zip(run.token_ids, reference))
        results.append(
            MethodResult(
                name=name,
                speculative_config=spec,
                startup_s=startup,
                tokens=run.num_output_tokens,
                seconds=run.seconds,
                tokens_per_second=run.tokens_per_second,
                speedup=run.tokens_per_second / base_tps if base_tps else 0.0,
                mean_acceptance_length=run.spec.mean_acceptance_length if spec else None,
                acceptance_per_position=run.spec.acceptance_per_position if spec else [],
                draft_acceptance_rate=run.spec.draft_acceptance_rate if spec else None,
                identical=identical,
                num_prompts=len(conversations),
            )
        )
    return results


def format_table(results: list[MethodResult], *, exact: bool = True) -> str:
    header = "| method | startup s | tok/s | speedup | τ | acceptance per position | identical to target |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for r in results:
        tau = f"{r.mean_acceptance_length:.2f}" if r.mean_acceptance_length is not None else "-"
        acc = " ".join(f"{a:.2f}" for a in r.acceptance_per_position) or "-"
        same = "-" if r.identical is None or not exact else f"{r.identical}/{r.num_prompts}"
        lines.append(
            f"| {r.name} | {r.startup_s:.1f} | {r.tokens_per_second:.1f} | {r.speedup:.2f}x | {tau} | {acc} | {same} |"
        )
    return "\n".join(lines)


def plot_acceptance(tables: dict[str, list[MethodResult]], path: Path) -> None:
    """Per-position acceptance curves, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4), squeeze=False)
    for ax, (dataset, results) in zip(axes[0], tables.items()):
        for r in results:
            if r.acceptance_per_position:
                xs = range(1, len(r.acceptance_per_position) + 1)
                ax.plot(xs, r.acceptance_per_position, marker="o", label=f"{r.name} (τ={r.mean_acceptance_length:.2f})")
                ax.set_xticks(list(xs))
        ax.set_xlabel("draft position")
        ax.set_ylabel("fraction of drafts accepted")
        ax.set_ylim(0, 1)
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(tables: dict[str, list[MethodResult]], path: Path) -> None:
    """Speedup over the target alone per method (bars, τ on top), one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(5.5, 0.6 * max(len(rs) for rs in tables.values()))
    fig, axes = plt.subplots(1, len(tables), figsize=(width * len(tables), 4.5), squeeze=False)
    for ax, (dataset, results) in zip(axes[0], tables.items()):
        names = [r.name for r in results]
        bars = ax.bar(range(len(results)), [r.speedup for r in results], color="tab:blue")
        for bar, r in zip(bars, results):
            if r.mean_acceptance_length is not None:
                ax.annotate(f"τ {r.mean_acceptance_length:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)  # fmt: skip
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(results)), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("speedup vs target alone (tok/s ratio)")
        ax.set_title(dataset)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heldout_conversations(data_dir: Path, limit: int) -> list[list[dict]]:
    """First user turn (with its system prompt, if any) of each held-out conversation."""
    convs = []
    with open(data_dir / "heldout.jsonl") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            convs.append(messages[: first_user + 1])
            if len(convs) == limit:
                break
    return convs


def write_results(out: Path, tables: dict[str, list[MethodResult]], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "results": {name: [asdict(r) for r in rs] for name, rs in tables.items()},
    }
    (out / "eval.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = [f"## {name}\n\n{format_table(rs, exact=meta.get('temperature', 0.0) == 0.0)}\n" for name, rs in tables.items()]
    (out / "eval.md").write_text("\n".join(md))
    plot_acceptance(tables, out / "acceptance.png")
    plot_speedup(tables, out / "speedup.png")

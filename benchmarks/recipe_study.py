"""The offline recipe study: drafter recipes trained at equal budget, scored on held-out data.

    python benchmarks/recipe_study.py --features F/train --heldout F/heldout --runs runs/study \\
        --out benchmarks/results/recipe-study --max-steps 300 --only eagle eagle3-u3

``--data-fractions 0.25 0.5 1`` trains every row on each share of the conversations (a
nested random subset, ``LoopConfig.data_fraction``) at the same step budget: the
data-size ablation (does a recipe get better with more data, or only with more steps?).

Every row trains one recipe variant (``VARIANTS``) through the one loop on the same
features, the same batches (same seed) and the same optimizer-step budget, then scores
the held-out features with the recipe's own loss, **unrolled to ``--eval-unroll`` drafting
steps for every row** (an EAGLE drafter trained on one step is still asked to draft
several, as vLLM does). Top-1 at step j is then the chance the drafter's top token equals
the target's at drafting step j given steps 1..j-1 were right: the greedy per-position
acceptance. From it, the expected accepted length of a k-token chain::

    tau(k) = 1 + sum_{i=1..k} prod_{j<=i} a_j        (a_j = held-out top-1 at step j)

the number a T=0 chain would reach in vLLM if acceptances at different steps were
independent given the prefix (vLLM measures the real tau: ``vllm-coral bench``). Each row
also records its wall time and CPU-hours (wall x threads), so recipes compare on
tau per CPU-hour. Runs resume (``--resume`` in the loop) and finished rows are skipped, so
a study can be cut and continued.

``--init DRAFTER`` warm-starts every row it trains from that checkpoint (rows named
``VARIANT+init``; e.g. HASS or CORAL unrolled steps on top of a trained EAGLE drafter, whose
budget is then the sum of both runs).

``--score NAME=FEATURES`` scores every row on more feature sets too (a table each). The
held-out split's answers run to 384 tokens and fall into loops late in long answers, which
a drafter predicts easily: they overstate what vLLM accepts on short benchmark answers
(EAGLE on the 12K set: 0.639 there, 0.458 on MT-bench answered at 128 tokens, 0.38 served).
So the study also scores held-out prompts and MT-bench answered as ``vllm-coral bench``
answers them (2 turns, 128 tokens each): see benchmarks/results/recipe-study-12k/README.md.

Writes ``recipe_study.json`` (every row: configs, per-step scores, timings), ``.md``, ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, git_sha, now_utc, write_outputs  # noqa: E402

from vllm_coral.models.checkpoint import portable_path  # noqa: E402
from vllm_coral.models.registry import load_drafter  # noqa: E402
from vllm_coral.models.target import TargetHead  # noqa: E402
from vllm_coral.training.dataset import FeatureDataset  # noqa: E402
from vllm_coral.training.evaluate import evaluate  # noqa: E402
from vllm_coral.training.loop import LoopConfig, run  # noqa: E402
from vllm_coral.training.recipes import get_recipe  # noqa: E402

# name -> (recipe, recipe-config overrides, one line saying what the row tests)
VARIANTS = {
    "eagle": ("eagle", {}, "EAGLE-1/2: last-layer feature in, feature regression + 0.1 CE, 1 step"),
    "hass": ("hass", {}, "HASS: EAGLE + 3 harmonized steps + top-10 distillation"),
    "eagle-v8k": ("eagle", {"loss_vocab": 8192}, "EAGLE, logit losses over the 8192 most written tokens"),
    "hass-v8k": ("hass", {"loss_vocab": 8192}, "HASS, logit losses over the 8192 most written tokens"),
    "eagle-tok": ("eagle", {"feature_weight": 0.0, "ce_weight": 1.0}, "EAGLE inputs, token loss only"),
    "eagle3-u1": ("eagle3", {"unroll": 1}, "EAGLE-3 inputs (fused layers 2/15/27), token loss, 1 step"),
    "eagle3-u3": ("eagle3", {"unroll": 3}, "EAGLE-3: fused inputs + 3 training-time-test steps"),
    "eagle3-u3-v8k": ("eagle3", {"unroll": 3, "draft_vocab": 8192}, "EAGLE-3 u3, 8192-token draft vocabulary"),
    "eagle3-u3-v16k": ("eagle3", {"unroll": 3, "draft_vocab": 16384}, "EAGLE-3 u3, 16384-token draft vocabulary"),
    "eagle3-u3-2l": ("eagle3", {"unroll": 3, "layers": 2}, "EAGLE-3 u3, two decoder layers"),
    "eagle3-u3-detach": ("eagle3", {"unroll": 3, "detach": True}, "EAGLE-3 u3, no gradient between steps"),
    "eagle3-u3-csra": ("eagle3-csra", {"unroll": 3}, "EAGLE-3 u3 + CORAL's CSRA"),
    "fspad": ("fspad", {}, "FSPAD: feature sampling + partial alignment distillation, 1 step"),
    # FSPAD's ablation at the reduced loss vocabulary (both switches off is EAGLE: eagle-v8k).
    "coral-v8k": ("coral", {"loss_vocab": 8192}, "CORAL (HASS + CSRA), logit losses over 8192 tokens"),
    "fspad-v8k": ("fspad", {"loss_vocab": 8192}, "FSPAD, logit losses over 8192 tokens"),
    "fspad-nofs-v8k": ("fspad", {"loss_vocab": 8192, "feature_sampling": False}, "FSPAD without feature sampling"),
    "fspad-nopad-v8k": ("fspad", {"loss_vocab": 8192, "pad": False}, "FSPAD without partial alignment"),
    "fspad-hass-v8k": ("fspad-hass", {"loss_vocab": 8192}, "FSPAD + HASS's 3 harmonized steps + top-10 (ours)"),
}


def tau(accept: list[float], k: int) -> float:
    total, prod = 1.0, 1.0
    for a in accept[:k]:
        prod *= a
        total += prod
    return total


def variant_recipe(variant: str, init: Path | None = None):
    """The variant's recipe and its preset config with the variant's overrides (and ``init``)."""
    recipe_name, overrides, _ = VARIANTS[variant]
    recipe = get_recipe(recipe_name)
    if init is not None:
        if not hasattr(recipe.preset, "init"):
            raise ValueError(f"--init: recipe {recipe_name} (row {variant}) has no warm start")
        overrides = {**overrides, "init": str(init)}
    return recipe, replace(recipe.preset, **overrides)


def row_name(variant: str, fraction: float, init: Path | None = None) -> str:
    """'eagle3-u3', 'eagle3-u3@0.25' for a row trained on a quarter of the conversations,
    'coral-v8k+init' for one warm-started from ``--init``."""
    return variant + ("" if fraction == 1.0 else f"@{fraction:g}") + ("" if init is None else "+init")


def run_folder(runs: Path, name: str) -> Path:
    return runs / name.replace("@", "-f").replace("+", "-")


def train_row(variant: str, args, loop: LoopConfig) -> dict:
    """Train and score one variant on ``loop.data_fraction`` of the conversations."""
    name = row_name(variant, loop.data_fraction, args.init)
    recipe_name, _, what = VARIANTS[variant]
    if loop.data_fraction != 1.0:
        what += f" ({loop.data_fraction:g} of the conversations)"
    if args.init is not None:
        what += f" (from {portable_path(args.init)})"
    recipe, cfg = variant_recipe(variant, args.init)
    out = run_folder(args.runs, name)
    summary = run(recipe, cfg, loop, args.target, args.features, out, resume=(out / "trainer_state.json").exists(),
                  meta={"target": "smollm2-135m", "features": str(args.features)})  # fmt: skip
    (scored,) = score(variant, out, [args.heldout], args, loop)
    config = {**asdict(cfg), **({"init": portable_path(args.init)} if args.init is not None else {})}
    return dict(name=name, recipe=recipe_name, what=what, config=config, data_fraction=loop.data_fraction,
                steps=summary["steps"], sequences=summary["sequences"],
                train_seconds=summary["train_seconds"], tokens_per_second=summary["tokens_per_second"],
                cpu_hours=summary["train_seconds"] * torch.get_num_threads() / 3600, heldout=scored["terms"],
                accept=scored["accept"], tau=scored["tau"])  # fmt: skip


def score(variant: str, run_dir: Path, sets: list[Path], args, loop: LoopConfig) -> list[dict]:
    """The row's drafter (``run_dir``/drafter) scored on each features folder of ``sets``,
    unrolled to ``--eval-unroll`` steps (the target head and the drafter are loaded once)."""
    recipe, cfg = variant_recipe(variant)
    cfg = _eval_cfg(cfg, args.eval_unroll)
    head = TargetHead.load(args.target)
    module, _ = load_drafter(run_dir / "drafter", head.config)
    out = []
    for features in sets:
        terms = evaluate(recipe, cfg, module, head, features, max_seq_len=loop.max_seq_len,
                         batch_tokens=loop.batch_tokens)  # fmt: skip
        accept = [terms[f"acc/top1_step{j}"] for j in range(1, args.eval_unroll + 1)]
        out.append(dict(features=portable_path(features), tokens=terms["tokens"], terms=terms, accept=accept,
                        tau={k: tau(accept, k) for k in range(1, args.eval_unroll + 1)}))  # fmt: skip
    return out


def add_scores(row: dict, variant: str, args, loop: LoopConfig) -> dict:
    """Score ``row`` on every ``--score`` set it lacks (from its run folder); a row whose run
    folder is gone keeps what it has, and says so."""
    scores = row.setdefault("scores", {})
    run_dir = run_folder(args.runs, row["name"])
    missing = [(name, features) for name, features in args.score if name not in scores]
    if missing and not (run_dir / "drafter").is_dir():
        print(f"{row['name']}: not scored on {', '.join(n for n, _ in missing)}: no drafter in {run_dir}",
              file=sys.stderr)  # fmt: skip
    elif missing:
        for (name, _), scored in zip(missing, score(variant, run_dir, [f for _, f in missing], args, loop)):
            scores[name] = {k: v for k, v in scored.items() if k != "terms"}
    return row


def _eval_cfg(cfg, unroll: int):
    cfg = replace(cfg, unroll=unroll)
    return replace(cfg, topk=None) if hasattr(cfg, "topk") else cfg  # top-K is a loss term, not a score


def to_markdown(result: dict) -> str:
    k, k3 = result["eval_unroll"], str(min(3, result["eval_unroll"]))
    head = (f"| row | what | top-1 by step | tau(k={k3}) | tau(k={k}) | steps | tok/s | CPU-h |\n"
            "|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    rows = [f"| {r['name']} | {r['what']} | {' / '.join(f'{a:.3f}' for a in r['accept'])} | {r['tau'][k3]:.2f} | "
            f"{r['tau'][str(k)]:.2f} | {r['steps']} | {r['tokens_per_second']:.0f} | {r['cpu_hours']:.2f} |"
            for r in result["rows"]]  # fmt: skip
    meta = (f"{result['device']}; features {result['features']} ({result['train_tokens']} train tokens), "
            f"held-out {result['heldout']}; loop {json.dumps(result['loop'])}; git {result['git']}\n\n")  # fmt: skip
    return f"# Recipe study (held-out, offline)\n\n{meta}" + head + "\n".join(rows) + "\n" + _scores_markdown(result)


def _scores_markdown(result: dict) -> str:
    """One table per ``--score`` set (e.g. MT-bench answered as the served benchmark answers it)."""
    k3 = str(min(3, result["eval_unroll"]))
    out = []
    for name, features in result.get("score_sets", {}).items():
        rows = [f"| {r['name']} | {' / '.join(f'{a:.3f}' for a in s['accept'])} | {s['tau'][k3]:.2f} | {s['tokens']} |"
                for r in result["rows"] if (s := r.get("scores", {}).get(name))]  # fmt: skip
        out.append(f"\n## Scored on {name} ({features})\n\n| row | top-1 by step | tau(k={k3}) | tokens |\n"
                   "|---|---|---|---|\n" + "\n".join(rows) + "\n")  # fmt: skip
    return "".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k3 = str(min(3, result["eval_unroll"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in result["rows"]:
        steps = range(1, len(r["accept"]) + 1)
        a.plot(steps, r["accept"], marker="o", label=r["name"])
        b.scatter(r["cpu_hours"], r["tau"][k3], label=r["name"])
        b.annotate(r["name"], (r["cpu_hours"], r["tau"][k3]), fontsize=7)
    a.set(xlabel="drafting step j", ylabel="held-out top-1 (greedy acceptance)", title="per-step top-1")
    a.legend(fontsize=7)
    b.set(xlabel="training CPU-hours", ylabel=f"estimated tau, k={k3} chain", title="tau vs training cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", type=Path, required=True, help="target checkpoint folder")
    p.add_argument("--features", type=Path, required=True)
    p.add_argument("--heldout", type=Path, required=True)
    p.add_argument("--runs", type=Path, required=True, help="run folders (one per row; resumable)")
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--eval-unroll", type=int, default=5)
    p.add_argument("--data-fractions", type=float, nargs="+", default=[1.0],
                   help="train every row on each of these shares of the conversations (data-size ablation)")
    p.add_argument("--init", type=Path, default=None, help="warm-start every row from this drafter checkpoint "
                   "(rows named VARIANT+init)")  # fmt: skip
    p.add_argument("--score", action="append", default=[], type=_named_path, metavar="NAME=FEATURES",
                   help="also score every row on these features (e.g. MT-bench answered as the served benchmark "
                        "does); finished rows are scored from their run folder")  # fmt: skip
    args = p.parse_args()
    loop = LoopConfig(epochs=args.epochs, max_steps=args.max_steps, batch_tokens=args.batch_tokens, lr=args.lr,
                      dtype=args.dtype, save_every=100, warmup_steps=20)  # fmt: skip
    index = json.loads((args.features / "index.json").read_text())
    train_tokens = sum(e["tokens"] for e in index["shards"])
    path = args.out / "recipe_study.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    done = {r["name"]: r for r in before.get("rows", [])}
    score_sets = {**before.get("score_sets", {}), **{n: portable_path(f) for n, f in args.score}}
    runs = [(v, f) for v in args.only for f in args.data_fractions]
    check_scoring_sets(args, loop, tuple(index.get("config", {}).get("aux_layers", ())))
    names = [row_name(v, f, args.init) for v, f in runs]
    rows = []
    for (variant, fraction), name in zip(runs, names):
        row = done.get(name) or train_row(variant, args, replace(loop, data_fraction=fraction))
        rows.append(add_scores(row, variant, args, replace(loop, data_fraction=fraction)))
        result = dict(device=device_name("cpu"), git=git_sha(), date=now_utc(), loop=asdict(loop),
                      features=portable_path(args.features), heldout=portable_path(args.heldout),
                      train_tokens=train_tokens, score_sets=score_sets,
                      eval_unroll=args.eval_unroll, rows=rows + [r for n, r in done.items() if n not in names])  # fmt: skip
        write_outputs(args.out, "recipe_study", json.loads(json.dumps(result)), to_markdown, plot)
    return 0


def check_scoring_sets(args, loop: LoopConfig, train_aux: tuple) -> None:
    """Fail before any training when a row could not be scored on ``--heldout`` or a ``--score``
    set (e.g. EAGLE-3 rows on features extracted without ``--aux-layers``)."""
    hidden_size = TargetHead.load(args.target).hidden_size
    checked = set()
    for variant in args.only:
        recipe, cfg = variant_recipe(variant)
        aux, text_ok = recipe.uses_aux(cfg), recipe.reads_text(cfg)
        for features in [args.heldout] + [f for _, f in args.score]:
            if (features, aux, text_ok) in checked:  # the same read, for another row
                continue
            checked.add((features, aux, text_ok))
            try:
                data = FeatureDataset(features, loop.max_seq_len, hidden_size, aux=aux, text_ok=text_ok)
            except ValueError as e:
                raise SystemExit(f"cannot score {variant} rows: {e}") from None
            if aux and data.aux_layers != train_aux:
                raise SystemExit(f"{features}: aux layers {list(data.aux_layers)}, but the training features "
                                 f"have {list(train_aux)}; extract both with the same --aux-layers")  # fmt: skip


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FEATURES, e.g. mt_bench=features/mtb/train")
    return name, Path(path)


if __name__ == "__main__":
    raise SystemExit(main())

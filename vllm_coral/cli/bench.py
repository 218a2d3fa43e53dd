"""``vllm-coral demo | bench``: speculative decoding measured through real vLLM.

    vllm-coral demo                           # target vs the shipped drafters, T=0
    vllm-coral bench questions gsm8k --limit 100 --out q/gsm8k.jsonl
    vllm-coral bench offline --methods benchmarks/configs/smollm2-135m.json --questions q/gsm8k.jsonl --out r/off
    vllm-coral bench serve --questions q/gsm8k.jsonl --concurrency 1 4 16 --out r/serve
    vllm-coral bench report r/off r/serve --out r/all
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_bench_commands"]


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
        batch_size=args.batch_size or None,
        repeats=args.repeats,
        out=args.out,
    )
    print(format_table(results))
    if args.out:
        print(f"\nwrote {args.out / 'bench_offline.json'}, bench_offline.md and plots")
    return 0


def _bench_inputs(args: argparse.Namespace):
    """(target folder, method rows, datasets) shared by ``bench offline`` and ``bench serve``."""
    from vllm_coral.cli import resolve_target
    from vllm_coral.demo import shipped_methods
    from vllm_coral.models.checkpoint import read_config
    from vllm_coral.plugin.engine import quiet_vllm_logs
    from vllm_coral.workflows.bench.methods import load_methods_file, parse_method, resolve_methods
    from vllm_coral.workflows.bench.questions import load_questions
    from vllm_coral.workflows.bench.sweep import expand_k

    quiet_vllm_logs()  # VLLM_LOGGING_LEVEL=INFO in the environment brings vLLM's logs back
    target = resolve_target(args.target)
    target_config = read_config(target)
    entries: list = []
    default_k, base_dir = args.k[0], Path.cwd()
    if args.methods:
        entries, file_k, base_dir = load_methods_file(args.methods)
        default_k = file_k or default_k
    entries += [parse_method(text) for text in args.method]
    if not entries:  # the demo's rows: the target, ngram and the shipped drafters
        entries, base_dir = shipped_methods(args.target)
        entries = [{"name": "target", "method": "none"}, *entries]
    entries = expand_k(entries, args.k)
    specs = resolve_methods(entries, target_config=target_config, default_k=default_k, base_dir=base_dir,
                            resolve_model=resolve_target)  # fmt: skip
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
    from vllm_coral.workflows.bench.report import aggregate_repeats, format_headline, run_metadata, write_run

    target, specs, datasets = _bench_inputs(args)
    meta = run_metadata()
    rows = run_offline(
        target, specs, datasets, temperatures=args.temperature, draft_sample_methods=args.draft_sample_method,
        max_tokens=args.max_tokens, batch_size=args.batch_size or None, seed=args.seed, dtype=args.dtype,
        repeats=args.repeats, log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )  # fmt: skip
    path = write_run(args.out, "offline", rows, _bench_config(args, specs), meta)
    print(format_headline(aggregate_repeats([r.to_dict() for r in rows])))
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


def add_bench_commands(sub) -> None:
    _add_demo(sub)
    _add_bench(sub)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="the target alone vs self-drafting, ngram and the shipped drafters, in vLLM (T=0)")
    demo.add_argument("--target", default="smollm2-135m")
    demo.add_argument("--k", type=int, default=3,
                      help="num_speculative_tokens of the rows that do not set their own (the swept rows use 2)")
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.add_argument("--questions", type=Path, default=None, help="MT-bench-format .jsonl (all turns of each question)")
    demo.add_argument("--num-prompts", type=int, default=4)
    demo.add_argument(
        "--dtype", default="float32", help="vLLM dtype: float32 (exact comparison), bfloat16, auto"
    )
    demo.add_argument("--batch-size", type=int, default=1, help="requests per vLLM call (0: all prompts at once)")
    demo.add_argument("--repeats", type=int, default=3,
                      help="passes per method, each paired with a target pass (median speedup, min-max)")
    demo.add_argument("--out", type=Path, default=None, help="write bench_offline.json/.md and plots here")
    demo.set_defaults(func=_cmd_demo)



def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark speculative decoding through real vLLM").add_subparsers(
        dest="bench_command", required=True
    )
    for kind, text in (("offline", "every method with vllm.LLM on the same questions"),
                       ("serve", "every method behind vllm serve, OpenAI client at several concurrencies")):  # fmt: skip
        b = bench.add_parser(kind, help=text)
        b.add_argument("--target", default="smollm2-135m", help="embedded target name or a model folder")
        b.add_argument("--methods", type=Path, help="methods JSON file (see vllm_coral/workflows/bench/methods.py); "
                       "without it or --method: the demo's rows, benchmarks/configs/TARGET.json")  # fmt: skip
        b.add_argument("--method", action="append", default=[], help="one method as a JSON object; repeatable")
        b.add_argument("--questions", action="append", required=True,
                       help="[NAME=]PATH of an MT-bench-format .jsonl; repeatable")  # fmt: skip
        b.add_argument("--num-prompts", type=int, default=None if kind == "offline" else 16,
                       help="questions per file (default: all offline, 16 served)")  # fmt: skip
        b.add_argument("--max-tokens", type=int, default=128, help="per turn")
        b.add_argument("-k", "--num-speculative-tokens", dest="k", type=int, nargs="+", default=[3],
                       help="default k for rows that do not set it; several (e.g. 2 3 4 5 6): each such row "
                            "runs once per k, and the report shows the sweep and the best k")  # fmt: skip
        b.add_argument("--draft-sample-method", nargs="+", choices=["greedy", "probabilistic"],
                       default=["greedy", "probabilistic"], help="at T>0, each one gets its own rows")  # fmt: skip
        b.add_argument("--seed", type=int, default=0)
        b.add_argument("--dtype", default="float32")
        b.add_argument("--out", type=Path, required=True, help=f"folder for bench_{kind}.json/.md and plots")
        if kind == "offline":
            b.add_argument("--temperature", nargs="+", type=float, default=[0.0], help="e.g. 0 1")
            b.add_argument("--batch-size", type=int, default=8, help="requests per vLLM call (0: all at once)")
            b.add_argument("--repeats", type=int, default=1,
                           help="time every method's rows N times, each pass paired with a target pass "
                                "(median speedup and its min-max)")  # fmt: skip
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

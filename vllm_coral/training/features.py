"""``vllm-coral data features``: the target's last-layer (post-norm) hidden states for every
token of the generated conversations, with the loss mask, in sharded safetensors.

Per conversation, the chat template renders the messages; tokens belong to the loss mask
when they were *written by the assistant* (its content and the end-of-turn token), found
by rendering the conversation prefix by prefix: the tokens added by each assistant
message beyond the generation prompt. The target (HF transformers) runs over the whole
sequence once and ``last_hidden_state`` (after the final RMSNorm) is stored: that is the
feature vLLM hands an EAGLE drafter (checked by tests/vllm/test_feature_fidelity.py).

The target runs in ``compute_dtype``: the dtype the drafter will be served with, since
that is what vLLM will hand it. float32 by default (how this project serves on CPU);
bfloat16 is 1.5-1.7x faster on an AVX512-BF16 CPU (measured on SmolLM2, 768-token
sequences, 2 busy cores: 654-750 vs 435-450 tokens/s), 2.5x on one with AMX (40 ShareGPT
conversations, 2 idle cores: 2,400 vs 960 tokens/s), and matches a bf16 deployment; its
features differ from fp32 ones by 1.6% (relative L2; cosine 0.9999), and trained drafters
score the same held-out top-1 on either (EAGLE 0.3731 vs 0.3737, HASS 0.3138 vs 0.3140
over 19K tokens). ``dtype`` is only how features are stored.

Optionally (``aux_layers``, EAGLE-3's inputs) the residual stream entering each listed
layer is stored too, concatenated as ``aux_hidden`` [N, len(aux_layers) * H]: layer id i
is the sum hidden + residual after i decoder layers (0 = the embeddings), which is what
vLLM hands an ``eagle3`` drafter (``EagleModelMixin._maybe_add_hidden_state``: the value
at ``layer_idx`` = i after i layers) and what transformers returns as
``hidden_states[i]`` for i < num_layers. vLLM's default for Llama is (2, L // 2, L - 3).

Layout of the output folder::

    shard_00000.safetensors   input_ids [N] int32, loss_mask [N] uint8,
                              hidden [N, H] (--dtype), offsets [S+1] int64,
                              aux_hidden [N, k*H] (--dtype; only with aux_layers)
    index.json                {"shards": [{"file", "ids": [...], "tokens"}], "config": {...}}

Memory is bounded by ``shard_tokens``: a shard is written (to a temporary name, then
renamed) and listed in index.json as soon as it holds that many tokens. Resuming skips the
conversations of every listed shard, so a killed run redoes at most one shard.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["FeatureShard", "ShardWriter", "encode_conversation", "extract_features", "iter_shards"]


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask of assistant-written tokens."""

    def render(msgs, gen_prompt):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(render(messages, False))
    mask = [0] * len(full)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(ids(render(messages[:k], True)))
        end = len(ids(render(messages[: k + 1], False)))
        if full[:end] != ids(render(messages[: k + 1], False)) or end > len(full):
            raise ValueError("chat template is not prefix-consistent; cannot locate assistant tokens")
        for i in range(start, end):
            mask[i] = 1
    return full, mask


@dataclass
class FeatureShard:
    # [N] token ids of all sequences, concatenated.
    input_ids: torch.Tensor
    # [N] 1 where the token was written by the assistant.
    loss_mask: torch.Tensor
    # [N, H] post-norm last-layer hidden state of the target at each token.
    hidden: torch.Tensor
    # [S + 1] sequence boundaries: sequence s is [offsets[s], offsets[s+1]).
    offsets: torch.Tensor

    def sequences(self):
        for s in range(len(self.offsets) - 1):
            a, b = int(self.offsets[s]), int(self.offsets[s + 1])
            yield self.input_ids[a:b], self.loss_mask[a:b], self.hidden[a:b]


def iter_shards(folder: str | Path):
    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    for entry in index["shards"]:
        with safe_open(str(folder / entry["file"]), framework="pt") as f:
            yield FeatureShard(**{k: f.get_tensor(k) for k in ("input_ids", "loss_mask", "hidden", "offsets")})


class ShardWriter:
    """Buffers sequences and writes a shard (temporary name, then rename) plus index.json
    once ``shard_tokens`` are buffered, so a kill loses at most the shard in flight."""

    def __init__(self, out: Path, index: dict, store_dtype: torch.dtype, shard_tokens: int) -> None:
        self.out, self.index, self.dtype, self.shard_tokens = out, index, store_dtype, shard_tokens
        self.ids: list[torch.Tensor] = []
        self.mask: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self.aux: list[torch.Tensor] = []
        self.conv_ids: list[str] = []

    def add(self, conv_id: str, ids: list[int], mask: list[int], hidden: torch.Tensor | None,
            aux: torch.Tensor | None = None) -> None:  # fmt: skip
        """One sequence; ``hidden`` None for token-only shards (``vllm-coral data text``)."""
        self.ids.append(torch.tensor(ids))
        self.mask.append(torch.tensor(mask))
        if hidden is not None:
            self.hidden.append(hidden.to(self.dtype))
        if aux is not None:
            self.aux.append(aux.to(self.dtype))
        self.conv_ids.append(conv_id)
        if sum(len(x) for x in self.ids) >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.conv_ids:
            return
        name = f"shard_{len(self.index['shards']):05d}.safetensors"
        offsets = torch.tensor([0] + [len(x) for x in self.ids]).cumsum(0)
        tensors = {"input_ids": torch.cat(self.ids).to(torch.int32), "loss_mask": torch.cat(self.mask).to(torch.uint8),
                   "offsets": offsets.to(torch.int64)}  # fmt: skip
        if self.hidden:
            tensors["hidden"] = torch.cat(self.hidden)
        if self.aux:
            tensors["aux_hidden"] = torch.cat(self.aux)
        save_file(tensors, str(self.out / (name + ".tmp")))
        os.replace(self.out / (name + ".tmp"), self.out / name)
        self.index["shards"].append({"file": name, "ids": list(self.conv_ids), "tokens": int(offsets[-1])})
        tmp = self.out / "index.json.tmp"
        tmp.write_text(json.dumps(self.index) + "\n")
        os.replace(tmp, self.out / "index.json")
        for buf in (self.ids, self.mask, self.hidden, self.aux, self.conv_ids):
            buf.clear()


def _read_records(conversations: Path, max_samples: int | None) -> list[dict]:
    records = []
    with open(conversations) as f:
        for lineno, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except ValueError:
                print(f"{conversations}:{lineno}: skipped (invalid JSON)", file=sys.stderr)
    return records if max_samples is None else records[:max_samples]


def extract_features(
    target: str | Path,
    conversations: Path,
    out: Path,
    *,
    dtype: str = "bfloat16",
    max_length: int = 2048,
    shard_tokens: int = 200_000,
    max_samples: int | None = None,
    aux_layers: tuple[int, ...] = (),
    compute_dtype: str = "float32",
) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    store_dtype, run_dtype = dtypes[dtype], dtypes[compute_dtype]
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"shards": []}
    config = dict(target=Path(target).name, source=Path(conversations).name, dtype=dtype, max_length=max_length)
    if aux_layers:
        config["aux_layers"] = list(aux_layers)
    if compute_dtype != "float32":  # recorded only when set, so older folders still resume
        config["compute_dtype"] = compute_dtype
    if index.get("config", config) != config:
        raise ValueError(f"{out}: holds features made with {index['config']}, not {config}; use a new folder")
    index["config"] = config
    done = {i for entry in index["shards"] for i in entry["ids"]}
    todo = [r for r in _read_records(conversations, max_samples) if r["id"] not in done]

    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=run_dtype).eval()
    layers = model.config.num_hidden_layers
    if any(not 0 <= i < layers for i in aux_layers):
        raise ValueError(f"aux layers {list(aux_layers)} must be in [0, {layers}) for this target")
    writer = ShardWriter(out, index, store_dtype, shard_tokens)
    skipped = 0
    with torch.inference_mode():
        for record in tqdm(todo, desc="features", unit="conv", file=sys.stderr):
            ids, mask = encode_conversation(tokenizer, record["messages"])
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask):
                skipped += 1
                continue
            run = model.model(torch.tensor([ids]), output_hidden_states=bool(aux_layers))
            aux = torch.cat([run.hidden_states[i][0] for i in aux_layers], -1) if aux_layers else None
            writer.add(record["id"], ids, mask, run.last_hidden_state[0], aux)
        writer.flush()
    tokens = sum(e["tokens"] for e in index["shards"])
    return dict(shards=len(index["shards"]), conversations=len(done) + len(todo) - skipped, tokens=tokens, skipped=skipped)

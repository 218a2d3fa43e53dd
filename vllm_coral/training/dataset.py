"""Feature shards as a training dataset that need not fit in RAM, and its token-budget batches.

``vllm-coral data features`` writes shards of ``input_ids`` [N] int32, ``loss_mask`` [N]
uint8, ``hidden`` [N, H] and ``offsets`` [S+1] (``vllm_coral.training.features``). The
small per-token tensors (ids, masks, offsets) of every shard are read once, which is all
batching needs; the hidden states, 2-4 KB per token, are read only when a batch is
collated, as slices of the memory-mapped shard files (safetensors reads just those rows).
A 10M-token dataset thus costs ~60 MB of RAM plus the OS page cache, not 20-40 GB.

Token-only shards (``vllm-coral data text``: plain text for pretraining, no ``hidden``)
are read by the same class with ``text_ok=True``; their batches carry ``feats=None``.

Batches hold whole sequences up to ``batch_tokens`` tokens, padded to the longest; the
order is one seeded permutation per epoch, so a run is a deterministic function of
(seed, data), which is what makes ``--resume`` bit-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["Batch", "FeatureDataset", "epoch_batches", "token_batches"]


@dataclass
class Batch:
    # [B, S] token ids (0 past each sequence's end).
    ids: torch.Tensor
    # [B, S] 1.0 where the token was written by the assistant (0 for prompts and padding).
    mask: torch.Tensor
    # [B, S, H] the target's post-norm last-layer features, float32 (None for text tokens).
    feats: torch.Tensor | None
    # Seeded per (step, rank): recipes draw their noise from it, so resumed runs repeat it.
    generator: torch.Generator
    # [B, S, k*H] the residual stream entering the features' aux layers (EAGLE-3 inputs),
    # float32; None unless the dataset was opened with aux=True.
    aux: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        feats, aux = (None if t is None else t.to(device) for t in (self.feats, self.aux))
        return Batch(self.ids.to(device), self.mask.to(device), feats, self.generator, aux)


@dataclass(frozen=True)
class _Item:
    shard: int  # index into FeatureDataset.files
    start: int  # first token in the shard
    length: int  # tokens kept (truncated to max_seq_len)


class FeatureDataset:
    """Trainable sequences (>= 3 tokens with a scored token from index 2 on) of a features folder."""

    def __init__(self, folder: str | Path, max_seq_len: int, hidden_size: int, *, aux: bool = False,
                 text_ok: bool = False, fraction: float = 1.0, seed: int = 0) -> None:  # fmt: skip
        """``fraction`` < 1 keeps that share of the sequences, a random subset drawn with
        ``seed`` (nested: with one seed, the 1/4 subset is inside the 1/2 one)."""
        self.folder = Path(folder)
        self.aux = aux
        index_path = self.folder / "index.json"
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{index_path}: unreadable features index ({e}); run `vllm-coral data features`") from None
        self.files = [self.folder / entry["file"] for entry in index["shards"]]
        self.aux_layers = tuple(index.get("config", {}).get("aux_layers", ()))
        # text tokens without target features (``vllm-coral data text``)
        self.text = index.get("config", {}).get("kind") == "text"
        if self.text and not text_ok:
            raise ValueError(f"{self.folder}: text tokens without target features (`vllm-coral data text`): "
                             "only `train small-lm --loss ce` trains on them; this needs `vllm-coral data features`")  # fmt: skip
        if aux and not self.aux_layers:
            raise ValueError(f"{self.folder}: no aux-layer features; extract them with `data features --aux-layers ...`")
        self._ids: list[torch.Tensor] = []
        self._mask: list[torch.Tensor] = []
        self.items: list[_Item] = []
        for s, path in enumerate(self.files):
            self._read_small(s, path, max_seq_len, hidden_size)
        if not self.items:
            raise ValueError(f"{self.folder}: no trainable sequences")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"data fraction must be in (0, 1], got {fraction}")
        self.subset = fraction < 1.0
        if self.subset:
            perm = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(seed)).tolist()
            self.items = [self.items[i] for i in sorted(perm[: max(1, round(fraction * len(self.items)))])]
        self._handles: dict[int, object] = {}

    def _read_small(self, s: int, path: Path, max_seq_len: int, hidden_size: int) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                ids, mask, offsets = (f.get_tensor(k) for k in ("input_ids", "loss_mask", "offsets"))
                shape = None if self.text else f.get_slice("hidden").get_shape()
        except Exception as e:  # missing file, truncated header, missing tensor
            raise ValueError(f"{path}: unreadable feature shard ({type(e).__name__}: {e})") from None
        if not self.text and shape != [len(ids), hidden_size]:
            raise ValueError(f"{path}: hidden is {shape}, expected [{len(ids)}, {hidden_size}] (the target's width)")
        self._ids.append(ids)
        self._mask.append(mask)
        for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
            n = min(b - a, max_seq_len)
            if n >= 3 and bool(mask[a + 2 : a + n].any()):
                self.items.append(_Item(s, a, n))

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        return [item.length for item in self.items]

    def tokens(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [L], mask [L]) of sequence i, from memory."""
        it = self.items[i]
        return self._ids[it.shard][it.start : it.start + it.length], self._mask[it.shard][it.start : it.start + it.length]

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """[V] how often each token is an assistant-written (scored) token: the target's own output."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        pairs = (self.tokens(i) for i in range(len(self))) if self.subset else zip(self._ids, self._mask)
        for ids, mask in pairs:  # a subset counts its own sequences only
            counts += torch.bincount(ids[mask > 0].long(), minlength=vocab_size)
        return counts

    def most_written(self, vocab_size: int, n: int) -> torch.Tensor:
        """[n] the token ids written most often by the assistant, ties by id, ascending ids."""
        order = torch.sort(-self.token_counts(vocab_size), stable=True).indices
        return order[:n].sort().values

    def hidden(self, i: int, name: str = "hidden") -> torch.Tensor:
        """[L, H] features of sequence i (or ``aux_hidden`` [L, k*H]), read from the memory-mapped shard."""
        it = self.items[i]
        if it.shard not in self._handles:
            self._handles[it.shard] = safe_open(str(self.files[it.shard]), framework="pt")
        return self._handles[it.shard].get_slice(name)[it.start : it.start + it.length]

    def collate(self, indices: list[int], generator: torch.Generator) -> Batch:
        S = max(self.items[i].length for i in indices)
        ids = torch.zeros(len(indices), S, dtype=torch.long)
        mask = torch.zeros(len(indices), S)
        for r, i in enumerate(indices):
            x, m = self.tokens(i)
            ids[r, : len(x)] = x.long()
            mask[r, : len(x)] = m.float()
        feats = None
        if not self.text:
            rows = [self.hidden(i) for i in indices]
            feats = torch.zeros(len(indices), S, rows[0].shape[-1])
            for r, f in enumerate(rows):
                feats[r, : len(f)] = f.float()
        aux = None
        if self.aux:
            aux = torch.zeros(len(indices), S, len(self.aux_layers) * feats.shape[-1])
            for r, i in enumerate(indices):
                aux[r, : self.items[i].length] = self.hidden(i, "aux_hidden").float()
        return Batch(ids, mask, feats, generator, aux)


def token_batches(lengths: list[int], batch_tokens: int, order: list[int]) -> list[list[int]]:
    """Consecutive indices of ``order`` grouped so that longest * count <= batch_tokens."""
    out, cur, longest = [], [], 0
    for i in order:
        n = lengths[i]
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def epoch_batches(lengths: list[int], batch_tokens: int, epochs: int, seed: int) -> list[list[int]]:
    """Token-budget batches, one seeded shuffle per epoch, epochs concatenated."""
    batches = []
    for epoch in range(epochs):
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches += token_batches(lengths, batch_tokens, order)
    return batches

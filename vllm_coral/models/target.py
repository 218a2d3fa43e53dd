"""The target's frozen token embedding and LM head, shared by every feature-level drafter.

Read straight from the target checkpoint's safetensors (``model.embed_tokens.weight`` and
``lm_head.weight``; a tied head reuses the embedding), without building the target model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from vllm_coral.models.checkpoint import CheckpointError

__all__ = ["TargetHead"]

_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"


@dataclass
class TargetHead:
    # The target's HF config.json.
    config: dict
    # [V, H] token embedding E, frozen.
    embed: torch.Tensor
    # [V, H] LM head W, frozen (the same tensor as ``embed`` when tied).
    lm_head: torch.Tensor
    # The target checkpoint folder it was read from (recipes that copy more of the target
    # read it: the small-LM drafter's layers and tokenizer); None when built in memory.
    path: Path | None = None

    @classmethod
    def load(cls, target_dir: str | Path, dtype: torch.dtype = torch.float32) -> TargetHead:
        target_dir = Path(target_dir)
        try:
            config = json.loads((target_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{target_dir}/config.json: unreadable ({e})") from None
        found: dict[str, torch.Tensor] = {}
        for path in sorted(target_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in (_EMBED, _HEAD):
                    if name in f.keys():
                        found[name] = f.get_tensor(name)
        if _EMBED not in found:
            raise CheckpointError(f"{target_dir}: no {_EMBED} in its safetensors files")
        embed = found[_EMBED].to(dtype)
        if _HEAD in found:
            head = found[_HEAD].to(dtype)
        elif config.get("tie_word_embeddings", False):
            head = embed
        else:
            raise CheckpointError(f"{target_dir}: no {_HEAD} and tie_word_embeddings is false")
        expected = (config["vocab_size"], config["hidden_size"])
        for name, t in ((_EMBED, embed), (_HEAD, head)):
            if tuple(t.shape) != expected:
                raise CheckpointError(f"{target_dir}: {name} is {list(t.shape)}, config says {list(expected)}")
        return cls(config=config, embed=embed.requires_grad_(False), lm_head=head.requires_grad_(False), path=target_dir)

    def to(self, device: torch.device | str) -> TargetHead:
        """The same head on ``device`` (a tied head stays one tensor)."""
        embed = self.embed.to(device)
        head = embed if self.lm_head is self.embed else self.lm_head.to(device)
        return TargetHead(config=self.config, embed=embed, lm_head=head, path=self.path)

    def with_head_dtype(self, dtype: torch.dtype) -> TargetHead:
        """The same head with the LM head stored in ``dtype`` (the embedding stays as is).

        Under bf16 autocast, every ``h @ W.T`` would otherwise re-cast the 49152 x 576 head
        to bf16 on each call; a bf16 copy made once removes that (measured in
        ``benchmarks/bench_trainer.py``)."""
        return TargetHead(config=self.config, embed=self.embed, lm_head=self.lm_head.to(dtype), path=self.path)

    def rows(self, token_ids: torch.Tensor) -> TargetHead:
        """The same head restricted to ``token_ids`` [n]: ``logits`` then scores only those
        tokens, in that order (training losses over a frequent sub-vocabulary)."""
        rows = self.lm_head[token_ids.to(self.lm_head.device)]
        return TargetHead(config=self.config, embed=self.embed, lm_head=rows, path=self.path)

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., H]
        return F.embedding(ids, self.embed)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V]
        return h.to(self.lm_head.dtype) @ self.lm_head.T

"""CORAL drafter in vLLM: vLLM's EAGLE drafter with a routed, grouped LM head.

``EagleCoralLlamaForCausalLM`` is vLLM's ``EagleLlamaForCausalLM`` (same body, same
proposer: ``v1/spec_decode/llm_base_proposer.py``) with the logits path replaced:

- ``compute_logits(h)`` [T, H] -> [T, V]: the router picks k of N vocabulary groups per
  row and only their rows of the LM head are multiplied; every other logit is -inf. vLLM's
  greedy drafting takes the argmax of this; probabilistic drafting (``draft_sample_method:
  "probabilistic"``) samples from softmax(logits / T), which is exactly the renormalised
  distribution over the selected groups, and hands those probabilities to the rejection
  sampler, so sampling stays lossless.
- ``get_top_tokens(h)`` [T, H] -> [T]: greedy drafting without materialising [T, V]
  logits, used when the speculative config sets ``"use_local_argmax_reduction": true``.

The LM head is the target's (vLLM shares it after loading, since CORAL checkpoints ship
none). On first use it is permuted once into group-contiguous order
(``VocabPartition.grouped_weight``); the grouped matmul then reads only the selected row
ranges (``vllm_coral.kernels.dispatch``: Triton on CUDA, the torch twin on CPU).

Checkpoints come from ``vllm-coral train coral-router``; ``load_weights`` checks the
tensor set against ``vllm_coral.models.coral.coral_tensor_specs`` and the group map, and
fails with one line (``CheckpointError``) on a mismatch. Serve with the ordinary EAGLE
method: ``{"method": "eagle", "model": CKPT, "num_speculative_tokens": 3}``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, process_eagle_weight

from vllm_coral.models.checkpoint import CheckpointError, check_tensors, tensor_header
from vllm_coral.models.coral import (
    ROW_TO_TOKEN,
    Router,
    check_row_to_token,
    routed_logits,
    routed_top_tokens,
    select_groups,
)
from vllm_coral.models.registry import check_target, parse_drafter_config
from vllm_coral.models.vocab_groups import VocabPartition

__all__ = ["EagleCoralLlamaForCausalLM", "RoutedHead", "hf_config_dict"]


def hf_config_dict(config) -> dict:
    """The draft model's config.json as vLLM holds it (a transformers config object)."""
    hf = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    hf.setdefault("vllm_coral", getattr(config, "vllm_coral", None))
    return hf


class RoutedHead:
    """What CORAL's vLLM classes share (EAGLE here, EAGLE-3 in ``plugin/coral3.py``): the
    router, the partition of the head rows, and the head permuted group-contiguous on
    first use (rebuilt if vLLM swaps the tensor). Needs ``self.coral_config`` (with
    ``num_groups``, ``top_k``, ``partition``, ``group_size``, ``tensor_specs()``) and
    ``self.lm_head``."""

    def _init_routing(self, where: str, hidden_size: int, rows: int, dtype: torch.dtype) -> None:
        c = self.coral_config
        self._where = where
        self.router = Router(hidden_size, c.num_groups).to(dtype)
        # identity until load_weights reads the checkpoint's group map
        self._partition = VocabPartition(torch.arange(rows), c.num_groups, c.partition)
        self.register_buffer("row_to_token", self._partition.row_to_token.clone(), persistent=False)
        self._grouped_weight: torch.Tensor | None = None
        self._grouped_source: int | None = None

    def _load_routing(self, weights: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """Check every tensor against the family's specs, load the router and the row map
        (a permutation of the head rows in N groups); returns the body's tensors."""
        check_tensors(self._where, tensor_header(dict(weights)), self.coral_config.tensor_specs())
        ours = {name: t for name, t in weights if name.startswith("router.") or name == ROW_TO_TOKEN}
        self._partition = check_row_to_token(ours.pop(ROW_TO_TOKEN), self.coral_config, self._where)
        self.row_to_token.copy_(self._partition.row_to_token)
        dtype = self.router.w1.weight.dtype
        self.router.load_state_dict({name[len("router."):]: t.to(dtype) for name, t in ours.items()})
        return [(name, t) for name, t in weights if not name.startswith("router.") and name != ROW_TO_TOKEN]

    def _grouped(self) -> torch.Tensor:
        weight = self.lm_head.weight
        if self._grouped_source != weight.data_ptr():
            # vLLM may pad the head's rows; the padding is never a row of the partition
            self._grouped_weight = self._partition.grouped_weight(weight.detach()[: self._partition.vocab_size])
            self._grouped_source = weight.data_ptr()
        return self._grouped_weight

    def _groups(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, k]
        return select_groups(self.router(hidden_states), self.coral_config.top_k)

    def _routed_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, rows], scaled
        logits = routed_logits(hidden_states, self._grouped(), self._groups(hidden_states),
                               self.coral_config.group_size, self.row_to_token)  # fmt: skip
        scale = self.logits_processor.scale
        return logits if scale == 1.0 else logits * scale

    def _routed_top_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T]
        return routed_top_tokens(hidden_states, self._grouped(), self._groups(hidden_states),
                                 self.coral_config.group_size, self.row_to_token)  # fmt: skip


class EagleCoralLlamaForCausalLM(RoutedHead, EagleLlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        where = f"CORAL drafter {vllm_config.speculative_config.draft_model_config.model}"
        _, _, self.coral_config, _ = parse_drafter_config(hf_config_dict(self.config), where)
        eagle = self.coral_config.eagle
        mc = vllm_config.model_config  # the target being served
        check_target(where, self.coral_config, {"hidden_size": mc.get_hidden_size(), "vocab_size": mc.get_vocab_size()})
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise CheckpointError(f"{where}: the routed LM head does not support tensor parallelism yet")
        self._init_routing(where, eagle.hidden_size, eagle.vocab_size, vllm_config.model_config.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the checkpoint; returns the parameter names now set, so vLLM's strict
        "every parameter loaded" check stays on. The embedding and LM head count as
        loaded: vLLM shares the target's with the drafter right after this call."""
        body = self._load_routing(list(weights))

        def renamed(name: str) -> str:  # as the parent's load_weights does
            name = name if "lm_head" in name else "model." + name
            process_eagle_weight(self, name)
            return name

        loaded = AutoWeightsLoader(self).load_weights((renamed(n), t) for n, t in body)
        shared = {name for name, _ in self.named_parameters() if "embed_tokens" in name or name.startswith("lm_head")}
        return set(loaded) | shared | {f"router.{name}" for name, _ in self.router.named_parameters()}

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, V]
        return self._routed_logits(hidden_states)

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T]
        return self._routed_top_rows(hidden_states)

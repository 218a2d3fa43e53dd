"""CORAL on EAGLE-3 in vLLM: vLLM's ``Eagle3LlamaForCausalLM`` with a routed LM head.

``Eagle3CoralLlamaForCausalLM`` keeps vLLM's EAGLE-3 body, aux-state fusion and proposer
(``vllm/model_executor/models/llama_eagle3.py``) and replaces only the logits path, as
``vllm_coral.plugin.coral`` does for EAGLE:

- ``compute_logits(n)`` [T, H] -> [T, V]: the router picks k of N groups of the head rows
  (the draft vocabulary's, or the target's whole head); only those rows are multiplied,
  every other logit is -inf, and draft ids map to target ids through ``d2t`` exactly as
  the parent does. Probabilistic drafting samples from the renormalised distribution over
  the selected rows and hands it to the rejection sampler, so sampling stays lossless.
- ``get_top_tokens(n)`` [T, H] -> [T]: greedy drafting without [T, V] logits (the
  speculative config sets ``"use_local_argmax_reduction": true``).

The head rows are permuted once into group-contiguous order on first use (and again if
vLLM swaps the tensor: without a draft vocabulary the head is the target's, shared after
loading). Checkpoints come from ``vllm-coral train coral-router --drafter EAGLE3_CKPT``;
``load_weights`` checks the tensor set against ``Coral3Config.tensor_specs`` and the row
map, with one line (``CheckpointError``) on a mismatch. Serve with the ordinary method:
``{"method": "eagle3", "model": CKPT, "num_speculative_tokens": 3}``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

from vllm_coral.models.checkpoint import CheckpointError, check_tensors, tensor_header
from vllm_coral.models.coral import ROW_TO_TOKEN, Router, routed_logits, routed_top_tokens, select_groups
from vllm_coral.models.coral3 import check_head_rows
from vllm_coral.models.registry import check_target, parse_drafter_config
from vllm_coral.models.vocab_groups import VocabPartition
from vllm_coral.plugin.coral import _hf_dict

__all__ = ["Eagle3CoralLlamaForCausalLM"]


class Eagle3CoralLlamaForCausalLM(Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        where = f"CORAL-3 drafter {vllm_config.speculative_config.draft_model_config.model}"
        _, _, self.coral_config, _ = parse_drafter_config(_hf_dict(self.config), where)
        mc = vllm_config.model_config  # the target being served
        check_target(where, self.coral_config, {"hidden_size": mc.get_hidden_size(), "vocab_size": mc.get_vocab_size(),
                                                "num_hidden_layers": mc.get_total_num_hidden_layers()})  # fmt: skip
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise CheckpointError(f"{where}: the routed LM head does not support tensor parallelism yet")
        self._where = where
        c = self.coral_config
        self.router = Router(c.hidden_size, c.num_groups).to(vllm_config.model_config.dtype)
        self._partition = VocabPartition(torch.arange(c.head_rows), c.num_groups, c.partition)  # identity until loaded
        self.register_buffer("row_to_token", self._partition.row_to_token.clone(), persistent=False)
        self._grouped_weight: torch.Tensor | None = None
        self._grouped_source: int | None = None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """Check every tensor against the family's specs, load the router and row map, and
        hand the EAGLE-3 tensors to the parent (which maps d2t/t2d and the names)."""
        weights = list(weights)
        check_tensors(self._where, tensor_header(dict(weights)), self.coral_config.tensor_specs())
        ours = {name: t for name, t in weights if name.startswith("router.") or name == ROW_TO_TOKEN}
        self._partition = check_head_rows(ours.pop(ROW_TO_TOKEN), self.coral_config, self._where)
        self.row_to_token.copy_(self._partition.row_to_token)
        dtype = self.router.w1.weight.dtype
        self.router.load_state_dict({name[len("router."):]: t.to(dtype) for name, t in ours.items()})
        return super().load_weights((n, t) for n, t in weights if not n.startswith("router.") and n != ROW_TO_TOKEN)

    def _grouped(self) -> torch.Tensor:
        weight = self.lm_head.weight
        if self._grouped_source != weight.data_ptr():
            # vLLM may pad the head's rows; the padding is never a row of the partition
            self._grouped_weight = self._partition.grouped_weight(weight.detach()[: self._partition.vocab_size])
            self._grouped_source = weight.data_ptr()
        return self._grouped_weight

    def _groups(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, k]
        return select_groups(self.router(hidden_states), self.coral_config.top_k)

    def _to_target_ids(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.draft_id_to_target_id is None else rows + self.draft_id_to_target_id[rows]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, V]
        logits = routed_logits(hidden_states, self._grouped(), self._groups(hidden_states),
                               self.coral_config.group_size, self.row_to_token)  # fmt: skip
        scale = self.logits_processor.scale
        logits = logits if scale == 1.0 else logits * scale
        if self.draft_id_to_target_id is None:
            return logits
        full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self._to_target_ids(torch.arange(logits.shape[1], device=logits.device))] = logits
        return full

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T]
        rows = routed_top_tokens(hidden_states, self._grouped(), self._groups(hidden_states),
                                 self.coral_config.group_size, self.row_to_token)  # fmt: skip
        return self._to_target_ids(rows)

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

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.registry import check_target, parse_drafter_config
from vllm_coral.plugin.coral import RoutedHead, hf_config_dict

__all__ = ["Eagle3CoralLlamaForCausalLM"]


class Eagle3CoralLlamaForCausalLM(RoutedHead, Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        where = f"CORAL-3 drafter {vllm_config.speculative_config.draft_model_config.model}"
        _, _, self.coral_config, _ = parse_drafter_config(hf_config_dict(self.config), where)
        c = self.coral_config
        mc = vllm_config.model_config  # the target being served
        check_target(where, c, {"hidden_size": mc.get_hidden_size(), "vocab_size": mc.get_vocab_size(),
                                "num_hidden_layers": mc.get_total_num_hidden_layers()})  # fmt: skip
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise CheckpointError(f"{where}: the routed LM head does not support tensor parallelism yet")
        self._init_routing(where, c.hidden_size, c.head_rows, mc.dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        """Router and row map here; the EAGLE-3 tensors go to the parent, which maps
        d2t/t2d and the names (and, like it, returns None: no strict loaded-set check)."""
        return super().load_weights(self._load_routing(list(weights)))

    def _to_target_ids(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.draft_id_to_target_id is None else rows + self.draft_id_to_target_id[rows]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, V]
        logits = self._routed_logits(hidden_states)
        if self.draft_id_to_target_id is None:
            return logits
        full = logits.new_full((logits.shape[0], self.config.vocab_size), float("-inf"))
        full[:, self._to_target_ids(torch.arange(logits.shape[1], device=logits.device))] = logits
        return full

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T]
        return self._to_target_ids(self._routed_top_rows(hidden_states))

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
tensor set against ``vllm_coral.models.coral.coral_tensor_shapes`` and the group map, and
fails with one line (``CheckpointError``) on a mismatch. Serve with the ordinary EAGLE
method: ``{"method": "eagle", "model": CKPT, "num_speculative_tokens": 3}``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM

from vllm_coral.models.checkpoint import CheckpointError, check_tensors
from vllm_coral.models.coral import (
    ROW_TO_TOKEN,
    Router,
    check_row_to_token,
    coral_tensor_shapes,
    read_coral_config,
    routed_logits,
    routed_top_tokens,
    select_groups,
)
from vllm_coral.models.eagle import check_same_target
from vllm_coral.models.vocab_groups import VocabPartition

__all__ = ["EagleCoralLlamaForCausalLM"]


class EagleCoralLlamaForCausalLM(EagleLlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        where = f"CORAL drafter {vllm_config.speculative_config.draft_model_config.model}"
        self.coral_config = read_coral_config({"vllm_coral": getattr(self.config, "vllm_coral", None)}, where)
        eagle = self.coral_config.eagle
        mc = vllm_config.model_config  # the target being served
        check_same_target(where, eagle, {"hidden_size": mc.get_hidden_size(), "vocab_size": mc.get_vocab_size()})
        if vllm_config.parallel_config.tensor_parallel_size > 1:
            raise CheckpointError(f"{where}: the routed LM head does not support tensor parallelism yet")
        self._where = where
        dtype = vllm_config.model_config.dtype
        self.router = Router(eagle.hidden_size, self.coral_config.num_groups).to(dtype)
        # identity until load_weights reads the checkpoint's group map
        self._partition = VocabPartition(torch.arange(eagle.vocab_size), self.coral_config.num_groups,
                                         self.coral_config.partition)  # fmt: skip
        self.register_buffer("row_to_token", self._partition.row_to_token.clone(), persistent=False)
        # The target's LM head in group-contiguous row order, built on first use (the head
        # is shared by vLLM only after load_weights) and rebuilt if vLLM swaps the tensor.
        self._grouped_weight: torch.Tensor | None = None
        self._grouped_source: int | None = None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        body, ours = [], {}
        for name, tensor in weights:
            if name.startswith("router.") or name == ROW_TO_TOKEN:
                ours[name] = tensor
            else:
                body.append((name, tensor))
        shapes = {name: tuple(t.shape) for name, t in body}
        shapes.update({name: tuple(t.shape) for name, t in ours.items()})
        check_tensors(self._where, shapes, coral_tensor_shapes(self.coral_config))
        self._partition = check_row_to_token(ours[ROW_TO_TOKEN], self.coral_config, self._where)
        self.row_to_token.copy_(self._partition.row_to_token)
        self.router.load_state_dict(
            {name[len("router.") :]: t.to(self.router.w1.weight.dtype) for name, t in ours.items() if name != ROW_TO_TOKEN}
        )
        super().load_weights(body)
        # Like the parent, return None: vLLM's strict "every parameter loaded" tracking would
        # count the embedding and LM head, which are the target's and shared after loading.
        # check_tensors above already refused missing or unexpected tensors.
        return None

    def _grouped(self) -> torch.Tensor:
        weight = self.lm_head.weight
        if self._grouped_source != weight.data_ptr():
            # vLLM may pad the head's rows past V; the padding is never a token
            self._grouped_weight = self._partition.grouped_weight(weight.detach()[: self._partition.vocab_size])
            self._grouped_source = weight.data_ptr()
        return self._grouped_weight

    def _groups(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, k]
        return select_groups(self.router(hidden_states), self.coral_config.top_k)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, V]
        logits = routed_logits(hidden_states, self._grouped(), self._groups(hidden_states),
                               self.coral_config.group_size, self.row_to_token)  # fmt: skip
        scale = self.logits_processor.scale
        return logits if scale == 1.0 else logits * scale

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T]
        return routed_top_tokens(hidden_states, self._grouped(), self._groups(hidden_states),
                                 self.coral_config.group_size, self.row_to_token)  # fmt: skip

"""An EAGLE drafter that records what vLLM hands it: a debugging and verification tool.

``EagleRecorderLlamaForCausalLM`` behaves exactly like vLLM's ``EagleLlamaForCausalLM`` and
additionally writes, on every forward call, the ``input_ids`` [N], ``positions`` [N] and
``hidden_states`` [N, H] it received to ``$VLLM_CORAL_RECORD_DIR/call_<n>.safetensors``
(one file per call and worker process, fp32). On the first drafting step of a request
those hidden states are the target's own features for the whole prompt, which is how
``tests/vllm/test_feature_fidelity.py`` checks that our training features match what vLLM
serves. Calls during vLLM's warm-up (dummy inputs) are recorded too.

Use: save an EAGLE checkpoint, set ``"architectures": ["EagleRecorderLlamaForCausalLM"]``
in its config.json, set ``VLLM_CORAL_RECORD_DIR``, and serve it with ``"method": "eagle"``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM

__all__ = ["EagleRecorderLlamaForCausalLM"]


class EagleRecorderLlamaForCausalLM(EagleLlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        record_dir = os.environ.get("VLLM_CORAL_RECORD_DIR")
        if not record_dir:
            raise ValueError("EagleRecorderLlamaForCausalLM needs VLLM_CORAL_RECORD_DIR set")
        self._record_dir = Path(record_dir)
        self._record_dir.mkdir(parents=True, exist_ok=True)
        self._calls = 0

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        hidden_states: torch.Tensor,  # [N, H]
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        save_file(
            {
                "input_ids": input_ids.detach().cpu().contiguous(),
                "positions": positions.detach().cpu().contiguous(),
                "hidden_states": hidden_states.detach().float().cpu().contiguous(),
            },
            str(self._record_dir / f"call_{os.getpid()}_{self._calls:06d}.safetensors"),
        )
        self._calls += 1
        return super().forward(input_ids, positions, hidden_states, inputs_embeds)

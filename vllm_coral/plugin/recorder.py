"""EAGLE drafters that record what vLLM hands them: a debugging and verification tool.

``EagleRecorderLlamaForCausalLM`` behaves exactly like vLLM's ``EagleLlamaForCausalLM`` and
additionally writes, on every forward call, the ``input_ids`` [N], ``positions`` [N] and
``hidden_states`` [N, H] it received to ``$VLLM_CORAL_RECORD_DIR/call_<n>.safetensors``
(one file per call and worker process, fp32). On the first drafting step of a request
those hidden states are the target's own features for the whole prompt, which is how
``tests/vllm/test_feature_fidelity.py`` checks that our training features match what vLLM
serves. Calls during vLLM's warm-up (dummy inputs) are recorded too.

Use: save an EAGLE checkpoint, set ``"architectures": ["EagleRecorderLlamaForCausalLM"]``
in its config.json, set ``VLLM_CORAL_RECORD_DIR``, and serve it with ``"method": "eagle"``.

``Eagle3RecorderLlamaForCausalLM`` does the same for ``"method": "eagle3"`` and also
records what it computes: ``aux`` [N, kH] and ``fused`` [N, H] of each
``combine_hidden_states`` call, and the forward's outputs ``normed`` and ``prenorm``.
On a request's first drafting step (fresh KV cache, the whole prompt) our plain-torch
``Eagle3Drafter`` must reproduce those outputs from the same inputs
(``tests/vllm/test_eagle3_vllm.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

__all__ = ["Eagle3RecorderLlamaForCausalLM", "EagleRecorderLlamaForCausalLM"]


class _Recorder:
    def _start_recording(self) -> None:
        record_dir = os.environ.get("VLLM_CORAL_RECORD_DIR")
        if not record_dir:
            raise ValueError(f"{type(self).__name__} needs VLLM_CORAL_RECORD_DIR set")
        self._record_dir = Path(record_dir)
        self._record_dir.mkdir(parents=True, exist_ok=True)
        self._calls = 0

    def _record(self, kind: str, **tensors: torch.Tensor) -> None:
        tensors = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(self._record_dir / f"{kind}_{os.getpid()}_{self._calls:06d}.safetensors"))
        self._calls += 1


class EagleRecorderLlamaForCausalLM(_Recorder, EagleLlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._start_recording()

    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        hidden_states: torch.Tensor,  # [N, H]
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._record("call", input_ids=input_ids, positions=positions, hidden_states=hidden_states)
        return super().forward(input_ids, positions, hidden_states, inputs_embeds)


class Eagle3RecorderLlamaForCausalLM(_Recorder, Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._start_recording()

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = super().combine_hidden_states(hidden_states)
        self._record("combine", aux=hidden_states, fused=fused)
        return fused

    def forward(self, input_ids, positions, hidden_states, inputs_embeds=None):
        normed, prenorm = super().forward(input_ids, positions, hidden_states, inputs_embeds)
        self._record("call", input_ids=input_ids, positions=positions, hidden_states=hidden_states, normed=normed,
                     prenorm=prenorm)  # fmt: skip
        return normed, prenorm

"""FSPAD drafter in vLLM: vLLM's EAGLE drafter with feature sampling and a [predict | regress] output.

``EagleFspadLlamaForCausalLM`` is vLLM 0.32's ``EagleLlamaForCausalLM``
(``vllm/model_executor/models/llama_eagle.py``) with its body ``LlamaModel`` changed as
``vllm_coral.models.fspad`` describes, for T tokens::

    e = embed(input_ids)                          # [T, H], the target's (shared by vLLM)
    h = fc(concat(e, hidden_states))              # [T, H]; with bias when FS is on
    x = h + down(silu(gate e) * up(norm h))       # feature sampling (``sampler``)
    o, r = layers[0](positions, x, None)          # o = mlp(norm(r)), r = x + attn(x)
    PAD:  out = o + [r, r] -> (out[:, :H], out[:, H:])   # down_proj is I -> 2H
    else: out = o + r      -> (out, out)

How vLLM uses the pair, read in ``vllm/v1/spec_decode/llm_base_proposer.py`` (0.32):
``model_returns_tuple()`` is true for ``"method": "eagle"`` (only mtp, draft_model and
dflash return one tensor); every drafting step calls ``self.model(input_ids=...,
positions=..., hidden_states=...)`` (``pass_hidden_states_to_model``) and unpacks
``last_hidden_states, hidden_states = ret_hidden_states`` (first pass ~l.600, later steps
~l.754). ``last_hidden_states`` rows go to ``_sample_draft_tokens`` ->
``compute_logits``, i.e. the target's LM head (~l.615, ~l.763); ``hidden_states`` rows
are copied into the ``self.hidden_states`` buffer (~l.643, ~l.721) and passed as the
next step's ``hidden_states`` (~l.738). So output[0] = predict makes the logits and
output[1] = regress is fed back, which is exactly FSPAD's drafting.

vLLM's EAGLE config wrapper (``vllm/transformers_utils/configs/eagle.py``) renames every
draft architecture that does not start with "Eagle" to "Eagle" + name under
``"method": "eagle"``, hence the class name. It also copies every top-level field of
config.json onto the draft hf_config, which is where the switches
``fspad_feature_sampling`` / ``fspad_pad`` are read (via ``FspadConfig.from_checkpoint``).

``load_weights`` checks the tensor set against ``fspad_tensor_specs`` first and fails with
one line (``CheckpointError``) on a missing, unexpected or misshapen tensor. The
sampler's tensors are loaded here directly: the body's loader maps every ``.gate_proj`` /
``.up_proj`` onto Llama's fused ``gate_up_proj``, which the sampler (two inputs) has not.
Serve with ``{"method": "eagle", "model": CKPT, "num_speculative_tokens": k}`` and the
plugin loaded.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix, process_eagle_weight

from vllm_coral.models.checkpoint import check_tensors, tensor_header
from vllm_coral.models.fspad import FspadConfig
from vllm_coral.models.registry import check_target, parse_drafter_config

__all__ = ["EagleFspadLlamaForCausalLM"]

_SAMPLER = "sampler."


def hf_config_dict(config) -> dict:
    """The draft model's config.json as vLLM holds it (a transformers config object)."""
    hf = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    hf.setdefault("vllm_coral", getattr(config, "vllm_coral", None))
    return hf


class _Sampler(nn.Module):
    """``vllm_coral.models.fspad.FeatureSampler`` with vLLM layers (replicated on every rank)."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float, dtype, quant_config, prefix: str):
        super().__init__()

        def linear(n_in: int, n_out: int, name: str) -> ReplicatedLinear:
            return ReplicatedLinear(n_in, n_out, bias=False, params_dtype=dtype, quant_config=quant_config,
                                    prefix=f"{prefix}.{name}", return_bias=False)  # fmt: skip

        self.norm = RMSNorm(hidden_size, eps=eps)
        self.gate_proj = linear(hidden_size, intermediate_size, "gate_proj")
        self.up_proj = linear(hidden_size, intermediate_size, "up_proj")
        self.down_proj = linear(intermediate_size, hidden_size, "down_proj")

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:  # [T, H], [T, H] -> [T, H]
        return h + self.down_proj(F.silu(self.gate_proj(e)) * self.up_proj(self.norm(h)))


class FspadLlamaModel(LlamaModel):
    """vLLM's EAGLE body (torch.compile-decorated) with FSPAD's fc, sampler and 2H output."""

    def __init__(self, *, vllm_config, fspad: FspadConfig, prefix: str = "", start_layer_id: int = 0) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, start_layer_id=start_layer_id)
        self.feature_sampling, self.pad = fspad.feature_sampling, fspad.pad
        c, dtype = fspad.layer, vllm_config.model_config.dtype
        if fspad.feature_sampling:  # FSPAD's fc has a bias; vLLM's EAGLE fc has none
            self.fc = ReplicatedLinear(2 * c.hidden_size, c.hidden_size, bias=True, params_dtype=dtype,
                                       quant_config=self.quant_config, prefix=maybe_prefix(prefix, "fc"),
                                       return_bias=False)  # fmt: skip
            self.sampler = _Sampler(c.hidden_size, c.intermediate_size, c.rms_norm_eps, dtype, self.quant_config,
                                    maybe_prefix(prefix, "sampler"))  # fmt: skip
        if fspad.pad:  # replaces the I -> H down projection the parent built
            name = maybe_prefix(prefix, f"layers.{start_layer_id}.mlp.down_proj")
            self.layers[0].mlp.down_proj = RowParallelLinear(c.intermediate_size, 2 * c.hidden_size, bias=False,
                                                             quant_config=self.quant_config, prefix=name)  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        hidden_states: torch.Tensor,  # [T, H] target features, or the previous step's regress
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (predict for the logits, regress fed back), [T, H] each
        e = self.embed_tokens(input_ids)
        h = self.fc(torch.cat((e, hidden_states), dim=-1))
        if self.feature_sampling:
            h = self.sampler(h, e)
        out, residual = self.layers[0](positions, h, None)
        if not self.pad:
            out = out + residual
            return out, out
        out = out + torch.cat((residual, residual), dim=-1)
        predict, regress = out.split(out.shape[-1] // 2, dim=-1)
        return predict.contiguous(), regress.contiguous()


class EagleFspadLlamaForCausalLM(EagleLlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        # EagleLlamaForCausalLM.__init__ with FspadLlamaModel as the body: building the
        # parent's body first would register its attention layer under the same name twice.
        nn.Module.__init__(self)
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        where = f"FSPAD drafter {vllm_config.speculative_config.draft_model_config.model}"
        _, _, self.fspad_config, _ = parse_drafter_config(hf_config_dict(self.config), where)
        mc = vllm_config.model_config  # the target being served
        check_target(where, self.fspad_config, {"hidden_size": mc.get_hidden_size(), "vocab_size": mc.get_vocab_size()})
        self._where = where
        if getattr(self.config, "draft_vocab_size", None) is None:
            self.config.draft_vocab_size = self.config.vocab_size
        target_layers = mc.get_num_layers(vllm_config.parallel_config)
        self.model = FspadLlamaModel(vllm_config=vllm_config, fspad=self.fspad_config,
                                     prefix=maybe_prefix(prefix, "model"), start_layer_id=target_layers)  # fmt: skip
        self.logits_processor = LogitsProcessor(self.config.vocab_size, scale=getattr(self.config, "logit_scale", 1.0))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the checkpoint; returns the parameter names now set, so vLLM's strict
        "every parameter loaded" check stays on. The embedding and LM head count as
        loaded: vLLM shares the target's with the drafter right after this call."""
        weights = list(weights)
        check_tensors(self._where, tensor_header(dict(weights)), self.fspad_config.tensor_specs())
        loaded = set()
        if self.fspad_config.feature_sampling:
            params = dict(self.model.sampler.named_parameters())
            for name, tensor in weights:
                if name.startswith(_SAMPLER):
                    param = params[name[len(_SAMPLER) :]]
                    getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded = {f"model.{_SAMPLER}{name}" for name in params}

        def renamed(name: str) -> str:  # as the parent's load_weights does
            name = name if "lm_head" in name else "model." + name
            process_eagle_weight(self, name)
            return name

        body = ((renamed(name), t) for name, t in weights if not name.startswith(_SAMPLER))
        loaded |= set(AutoWeightsLoader(self).load_weights(body))
        shared = {name for name, _ in self.named_parameters() if "embed_tokens" in name or name.startswith("lm_head")}
        return loaded | shared

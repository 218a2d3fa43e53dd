"""FSPAD drafter: EAGLE with feature sampling and partial alignment distillation.

Source: FSPAD (Baichuan, 2024), the authors' code ``Luc4Gui/FSPAD`` @ 1c2df5e
(``eagle/model/cnets_fspad.py``, ``eagle/train/main_fspad.py``). At sequence index t,
with e = E[x_{t+1}] [B, S, H] (the frozen target embedding) and f = f_t [B, S, H]::

    h       = fc(concat(e, f))                                   # 2H -> H, with bias
    x       = h + down(silu(gate e) * up(rmsnorm(h)))             # feature sampling (FS)
    r       = x + attn(x)                                         # one layer, no input norm
    out     = concat(r, r) + mlp(norm(r))                         # PAD: MLP down_proj I -> 2H
    predict = out[..., :H]    -> logits = W_lm predict            # the target's head, frozen
    regress = out[..., H:]    -> regressed onto f_{t+1}; the next drafting step's feature

gate, up: H -> I and down: I -> H without bias, I = the intermediate size (the target's);
the RMSNorm before ``up`` has its own learnable weight (``Efc`` in the authors' code).
The SwiGLU's gate reads the token embedding, so the embedding "samples" which parts of
the feature pass. The switches are the authors' ablations:

- ``feature_sampling=False``: EAGLE's plain ``x = fc(concat(e, f))``. Ours has no bias
  (vLLM's EAGLE ``fc`` has none); the authors' w/o-FS ablation keeps one.
- ``pad=False``: EAGLE's single output, ``predict = regress = r + mlp(norm(r))``.

With both off the model computes exactly what ``EagleDrafter`` computes.

The checkpoint is EAGLE's (``eagle_tensor_specs``) plus, with FS, ``fc.bias`` [H] and
``sampler.{gate_proj,up_proj}.weight`` [I, H], ``sampler.down_proj.weight`` [H, I],
``sampler.norm.weight`` [H]; with PAD ``layers.0.mlp.down_proj.weight`` is [2H, I]. At
SmolLM2's shape (H=576, I=1536) FS adds 3HI + 2H = 2,655,360 parameters and PAD HI =
884,736. ``config.json`` is EAGLE's Llama config with the two switches top-level
(``fspad_feature_sampling``, ``fspad_pad``), which vLLM copies onto the draft hf_config
where ``vllm_coral.plugin.fspad`` reads them. vLLM's ``"method": "eagle"`` prefixes every
draft architecture that does not start with "Eagle" with "Eagle", hence the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vllm_coral.models.eagle import EagleConfig, eagle_tensor_specs
from vllm_coral.models.llama_layer import LlamaDecoderLayer, LlamaLayerShape, RMSNorm, rope_cos_sin
from vllm_coral.models.registry import DrafterFamily, ServeSpec

__all__ = ["ARCHITECTURE", "FAMILY", "FeatureSampler", "FspadConfig", "FspadDrafter", "PadDecoderLayer",
           "fspad_tensor_specs"]  # fmt: skip

ARCHITECTURE = "EagleFspadLlamaForCausalLM"
# config field -> its top-level config.json key (the vLLM adapter reads these from hf_config).
SWITCHES = {"feature_sampling": "fspad_feature_sampling", "pad": "fspad_pad"}


@dataclass(frozen=True)
class FspadConfig:
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = EagleConfig.TARGET_FIELDS
    # Shape of the decoder layer, vocabulary, RoPE and dtype (the EAGLE fields); the
    # sampler's width I is its intermediate_size.
    layer: EagleConfig
    # Feature sampling after fc (fc then has a bias); off: EAGLE's plain fc.
    feature_sampling: bool = True
    # Partial alignment distillation: 2H layer output [predict | regress]; off: one output.
    pad: bool = True

    def __post_init__(self) -> None:
        for name in SWITCHES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @property
    def torch_dtype(self) -> str:
        return self.layer.torch_dtype

    @classmethod
    def from_target(cls, target_config: Mapping, *, feature_sampling: bool = True, pad: bool = True,
                    **overrides) -> FspadConfig:  # fmt: skip
        """Drafter config for a target's HF ``config.json`` (a dict)."""
        return cls(EagleConfig.from_target(dict(target_config), **overrides), feature_sampling, pad)

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(EAGLE's Llama fields + the two switches, top-level; family fields: none)."""
        hf, _ = self.layer.to_checkpoint()
        hf.update({key: getattr(self, name) for name, key in SWITCHES.items()})
        return hf, {}

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> FspadConfig:
        if fields:
            raise ValueError(f"unknown FSPAD field(s) {', '.join(sorted(fields))}")
        missing = [key for key in SWITCHES.values() if not isinstance(hf.get(key), bool)]
        if missing:
            raise ValueError(f"config.json lacks true/false {', '.join(missing)}")
        switches = {name: hf[key] for name, key in SWITCHES.items()}
        return cls(EagleConfig.from_checkpoint(hf, {}), **switches)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return fspad_tensor_specs(self)


def fspad_tensor_specs(c: FspadConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The one weight-name map: EAGLE's tensors, the sampler's, and PAD's 2H down projection."""
    specs = eagle_tensor_specs(c.layer)
    H, I, dtype = c.layer.hidden_size, c.layer.intermediate_size, c.layer.dtype
    if c.feature_sampling:
        specs.update({
            "fc.bias": ((H,), dtype),
            "sampler.norm.weight": ((H,), dtype),
            "sampler.gate_proj.weight": ((I, H), dtype),
            "sampler.up_proj.weight": ((I, H), dtype),
            "sampler.down_proj.weight": ((H, I), dtype),
        })  # fmt: skip
    if c.pad:
        specs["layers.0.mlp.down_proj.weight"] = ((2 * H, I), dtype)
    return specs


class FeatureSampler(nn.Module):
    """h + down_proj(silu(gate_proj e) * up_proj(norm h)): a SwiGLU gated by the embedding."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(
        self,
        h: torch.Tensor,  # [..., H] fc(concat(e, f))
        e: torch.Tensor,  # [..., H] E[x_{t+1}]
    ) -> torch.Tensor:  # [..., H]
        return h + self.down_proj(F.silu(self.gate_proj(e)) * self.up_proj(self.norm(h)))


class PadDecoderLayer(LlamaDecoderLayer):
    """EAGLE's layer with a 2H-wide MLP output: r = x + attn(x); out = [r, r] + mlp(norm(r))."""

    def __init__(self, s: LlamaLayerShape) -> None:
        super().__init__(s)
        self.mlp.down_proj = nn.Linear(s.intermediate_size, 2 * s.hidden_size, bias=False)

    def skip(self, r: torch.Tensor) -> torch.Tensor:  # [B, S, 2H]: forward returns [predict | regress]
        return torch.cat((r, r), dim=-1)


class FspadDrafter(nn.Module):
    def __init__(self, config: FspadConfig) -> None:
        super().__init__()
        self.config = config
        c = config.layer
        H, s = c.hidden_size, c.layer_shape()
        self.fc = nn.Linear(2 * H, H, bias=config.feature_sampling)
        self.sampler = FeatureSampler(H, c.intermediate_size, c.rms_norm_eps) if config.feature_sampling else None
        self.layers = nn.ModuleList([PadDecoderLayer(s) if config.pad else LlamaDecoderLayer(s)])

    def forward(
        self,
        input_embeds: torch.Tensor,  # [B, S, H] E[x_{t+1}]
        features: torch.Tensor,  # [B, S, H] f_t (target) or the previous step's regress
        positions: torch.Tensor,  # [B, S] or [S] RoPE positions t
        attn_mask: torch.Tensor | None = None,  # [B or 1, 1, S, S] bool, None = causal
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (predict, regress), each [B, S, H]
        return self.run_layer(self.layer_input(input_embeds, features), positions, attn_mask)

    def layer_input(self, input_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """[B, S, H] the decoder layer's input: fc(concat(e, f)), then feature sampling."""
        h = self.fc(torch.cat((input_embeds, features), dim=-1))
        return h if self.sampler is None else self.sampler(h, input_embeds)

    def run_layer(
        self,
        x: torch.Tensor,  # [B, S, H] layer input
        positions: torch.Tensor,  # [B, S] or [S]
        attn_mask: torch.Tensor | None = None,  # [B or 1, 1, S, S_k] bool
        kv_inputs: list[torch.Tensor] | None = None,  # HASS: layer inputs of steps 1..j
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (predict for the head, regress fed back), [B, S, H]
        c = self.config.layer
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        out = self.layers[0](x, cos, sin, attn_mask, kv_inputs)
        if not self.config.pad:
            return out, out
        return out[..., : c.hidden_size], out[..., c.hidden_size :]

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under the names of ``fspad_tensor_specs``."""
        return dict(self.state_dict())

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.load_state_dict(dict(tensors))


FAMILY = DrafterFamily(
    name="fspad",
    config_cls=FspadConfig,
    model_cls=FspadDrafter,
    serve=ServeSpec(method="eagle", architecture=ARCHITECTURE,
                    vllm_class="vllm_coral.plugin.fspad:EagleFspadLlamaForCausalLM"),  # fmt: skip
    recipes={"fspad": "vllm_coral.training.fspad:FSPAD", "fspad-hass": "vllm_coral.training.fspad:FSPAD_HASS"},
    description="FSPAD: EAGLE + embedding-gated feature sampling + a 2H [predict | regress] output, "
                "served by vLLM's eagle through the plugin",
)

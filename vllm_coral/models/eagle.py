"""EAGLE-style feature-level drafter (EAGLE-1/2, and the base of HASS and CORAL).

At sequence index t the drafter sees the target's post-norm feature f_t and the embedding
of the *next* token x_{t+1}, at RoPE position t (vLLM shifts input ids left by one and
keeps the target's positions; ``vllm/v1/spec_decode/llm_base_proposer.py``)::

    x_t     = fc(concat(E[x_{t+1}], f_t))        # 2H -> H; vLLM's order: embedding first
    h_{t+1} = LlamaDecoderLayer(x)_t             # one layer, no input norm, causal
    logits  = W_lm h_{t+1}                       # the target's LM head, frozen and shared

Drafting feeds h_{t+1} back in place of f_{t+1}. The target's embedding E and head W are
not part of the checkpoint: vLLM shares the target's when the checkpoint has none, and
training passes them in frozen (``vllm_coral.models.target.TargetHead``).

The checkpoint is exactly what vLLM's built-in ``"method": "eagle"`` loads
(``EagleLlamaForCausalLM``): ``fc.weight`` [H, 2H] and ``layers.0.*`` without
``input_layernorm``, with a Llama ``config.json`` of one layer. ``eagle_tensor_specs`` is
the one weight-name map; saving and loading both check against it (``models.registry``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vllm_coral.models.llama_layer import LlamaDecoderLayer, LlamaLayerShape, rope_cos_sin
from vllm_coral.models.registry import DrafterFamily, ServeSpec

__all__ = ["FAMILY", "EagleConfig", "EagleDrafter", "eagle_tensor_specs"]

ARCHITECTURE = "EagleLlamaForCausalLM"
# The Llama fields of config.json that vLLM reads and EagleConfig mirrors one to one.
_HF_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "torch_dtype")  # fmt: skip
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EagleConfig:
    # Config fields that must equal the target's.
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = ("hidden_size", "vocab_size")
    # Model width; must equal the target's hidden size.
    hidden_size: int
    # MLP width of the drafter layer (the target's by default).
    intermediate_size: int
    # Query heads of the drafter layer.
    num_attention_heads: int
    # Key/value heads (GQA).
    num_key_value_heads: int
    # Per-head width.
    head_dim: int
    # The target's vocabulary size (its embedding and LM head are shared).
    vocab_size: int
    # RMSNorm epsilon.
    rms_norm_eps: float = 1e-5
    # RoPE base; the target's.
    rope_theta: float = 10000.0
    # Longest sequence the drafter is served with.
    max_position_embeddings: int = 2048
    # dtype recorded in config.json (vLLM's "auto" reads it).
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.layer_shape()  # validates sizes and head counts
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        if self.torch_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {self.torch_dtype!r}")

    def layer_shape(self) -> LlamaLayerShape:
        return LlamaLayerShape(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
        )

    @classmethod
    def from_target(cls, target_config: dict, **overrides) -> EagleConfig:
        """Drafter config matching a target's HF ``config.json`` (a dict)."""
        rope = target_config.get("rope_parameters") or {}
        heads = target_config["num_attention_heads"]
        values = dict(
            hidden_size=target_config["hidden_size"],
            intermediate_size=target_config["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=target_config.get("num_key_value_heads", heads),
            head_dim=target_config.get("head_dim") or target_config["hidden_size"] // heads,
            vocab_size=target_config["vocab_size"],
            rms_norm_eps=target_config.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", target_config.get("rope_theta", 10000.0)),
            max_position_embeddings=target_config.get("max_position_embeddings", 2048),
        )
        values.update(overrides)
        return cls(**values)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(config.json fields vLLM's Llama EAGLE loader reads, family fields: none)."""
        hf = {name: getattr(self, name) for name in _HF_FIELDS}
        hf.update(model_type="llama", num_hidden_layers=1, hidden_act="silu", attention_bias=False,
                  mlp_bias=False, tie_word_embeddings=False)  # fmt: skip
        return hf, {}

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> EagleConfig:
        """Rebuilt from the top-level fields vLLM reads (the one source of truth)."""
        if fields:
            raise ValueError(f"unknown EAGLE field(s) {', '.join(sorted(fields))}")
        if hf.get("num_hidden_layers", 1) != 1:
            raise ValueError(f"num_hidden_layers={hf['num_hidden_layers']}, an EAGLE drafter has exactly 1")
        # The same fields as transformers 5 hands them to vLLM: "dtype" for torch_dtype, and
        # rope_theta moved into rope_parameters.
        hf = {k: v for k, v in hf.items() if v is not None}
        dtype = hf.get("torch_dtype", hf.get("dtype"))
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        if "rope_theta" not in hf and isinstance(hf.get("rope_parameters"), Mapping):
            hf["rope_theta"] = hf["rope_parameters"].get("rope_theta")
        missing = [name for name in _HF_FIELDS if name not in hf]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        return cls(**{name: hf[name] for name in _HF_FIELDS})

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return eagle_tensor_specs(self)


def eagle_tensor_specs(c: EagleConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The one weight-name map: checkpoint tensor name -> (shape, dtype)."""
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    shapes = {
        "fc.weight": (H, 2 * H),
        "layers.0.self_attn.q_proj.weight": (q, H),
        "layers.0.self_attn.k_proj.weight": (kv, H),
        "layers.0.self_attn.v_proj.weight": (kv, H),
        "layers.0.self_attn.o_proj.weight": (H, q),
        "layers.0.post_attention_layernorm.weight": (H,),
        "layers.0.mlp.gate_proj.weight": (I, H),
        "layers.0.mlp.up_proj.weight": (I, H),
        "layers.0.mlp.down_proj.weight": (H, I),
    }
    return {name: (shape, c.dtype) for name, shape in shapes.items()}


class EagleDrafter(nn.Module):
    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config.layer_shape())])

    def forward(
        self,
        input_embeds: torch.Tensor,  # [B, S, H] E[x_{t+1}]
        features: torch.Tensor,  # [B, S, H] f_t (target) or h_t (the drafter's own)
        positions: torch.Tensor,  # [B, S] or [S] RoPE positions t
        attn_mask: torch.Tensor | None = None,  # [B or 1, 1, S, S] bool, None = causal
    ) -> torch.Tensor:  # [B, S, H] predicted h_{t+1}
        x = self.layer_input(input_embeds, features)
        return self.run_layer(x, positions, attn_mask)

    def layer_input(self, input_embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """fc(concat(E[x_{t+1}], f_t)) -> [B, S, H], the decoder layer's input."""
        return self.fc(torch.cat((input_embeds, features), dim=-1))

    def run_layer(
        self,
        x: torch.Tensor,  # [B, S, H] layer input
        positions: torch.Tensor,  # [B, S] or [S]
        attn_mask: torch.Tensor | None = None,  # [B or 1, 1, S, S_k] bool
        kv_inputs: list[torch.Tensor] | None = None,  # HASS: layer inputs of steps 1..j
    ) -> torch.Tensor:  # [B, S, H]
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        return self.layers[0](x, cos, sin, attn_mask, kv_inputs)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under the names of ``eagle_tensor_specs`` (vLLM's EAGLE names)."""
        return dict(self.state_dict())

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.load_state_dict(dict(tensors))


FAMILY = DrafterFamily(
    name="eagle",
    config_cls=EagleConfig,
    model_cls=EagleDrafter,
    serve=ServeSpec(method="eagle", architecture=ARCHITECTURE),
    recipes={
        "eagle": "vllm_coral.training.unrolled:EAGLE",
        "hass": "vllm_coral.training.unrolled:HASS",
        "coral": "vllm_coral.training.unrolled:CORAL",
    },
    description="EAGLE-1/2 feature drafter (fc + one Llama layer, the target's head), served by vLLM's eagle",
)

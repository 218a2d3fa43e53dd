"""EAGLE-3 feature drafter: fused low/mid/high target features, served by vLLM's ``eagle3``.

At sequence index t the drafter reads the residual streams entering k of the target's
layers (``aux_layers``; SmolLM2: 2, 15, 27, vLLM's default low/mid/high choice), fused
once by ``fc`` (kH -> H), and the embedding of the next token x_{t+1}, at RoPE position t::

    g_t   = fc(concat(a^{l_1}_t, ..., a^{l_k}_t))                   # step 1 only
    x     = concat(input_layernorm(E[x_{t+1}]), hidden_norm(g_t))    # [2H] into attention
    r     = g_t + o_proj(attention(x))                               # residual = g_t
    r     = r + mlp(post_attention_layernorm(r))                     # layer 0
    r     = r + attn(input_layernorm(r)); r = r + mlp(...)           # layers 1.. (optional)
    logits = W_lm norm(r)                                            # the target's head, frozen

Drafting step j >= 2 feeds the pre-norm output r (not g) back as the hidden input, which
is what vLLM's ``Eagle3LlamaForCausalLM`` returns as its second output
(``vllm/model_executor/models/llama_eagle3.py``). Unlike EAGLE-1/2 the output is never
asked to match a target feature: the drafter has its own final norm and is trained on
tokens only (``vllm_coral.training.ttt``).

Reduced draft vocabulary (EAGLE-3's other speed lever, optional): the drafter scores only
the ``draft_vocab_size`` tokens the target writes most often, with the rows of the target's
LM head for those tokens (``lm_head.weight`` [Vd, H], frozen). Drafting and training cost
then scale with Vd instead of V (SmolLM2: 49152 rows are 28M of a 33M-MAC drafting step);
a token outside the draft vocabulary can never be proposed, so Vd trades acceptance for
speed (the recipe study measures both). vLLM maps draft ids back with ``d2t`` [Vd]
(``target_id - draft_id``, vLLM's offset convention) and ignores ``t2d`` [V] (bool).

The checkpoint is what vLLM 0.32 loads for ``"method": "eagle3"``: ``fc.weight`` [H, kH],
``layers.{i}.*`` (layer 0 with ``hidden_norm`` and 2H-wide q/k/v), ``norm.weight``, and
with a draft vocabulary ``lm_head.weight``, ``d2t``, ``t2d``; no embedding, and without a
draft vocabulary no LM head, so vLLM shares the target's. ``config.json`` carries
``eagle_aux_hidden_state_layer_ids`` (vLLM makes the target emit exactly those layers),
``num_aux_hidden_states`` and ``draft_vocab_size``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vllm_coral.models.eagle import EagleConfig
from vllm_coral.models.llama_layer import MLP, Attention, LlamaLayerShape, RMSNorm, rope_cos_sin
from vllm_coral.models.registry import DrafterFamily, ServeSpec

__all__ = ["ARCHITECTURE", "FAMILY", "Eagle3Config", "Eagle3Drafter"]

ARCHITECTURE = "Eagle3LlamaForCausalLM"
_AUX = "eagle_aux_hidden_state_layer_ids"


@dataclass(frozen=True)
class Eagle3Config:
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = EagleConfig.TARGET_FIELDS
    # Shape of each decoder layer, vocabulary, RoPE and dtype (the EAGLE fields).
    layer: EagleConfig
    # Target layers whose input residual stream is fused by fc (vLLM's aux hidden states).
    aux_layers: tuple[int, ...]
    # Decoder layers of the drafter (EAGLE-3 ships 1).
    num_hidden_layers: int = 1
    # Tokens the drafter can propose (None: the whole vocabulary, sharing the target's head).
    draft_vocab_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "aux_layers", tuple(int(i) for i in self.aux_layers))
        if not self.aux_layers or min(self.aux_layers) < 0:
            raise ValueError(f"aux_layers must be non-empty target layer indices, got {list(self.aux_layers)}")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size < self.layer.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, vocab_size={self.layer.vocab_size}), "
                             f"got {self.draft_vocab_size}")  # fmt: skip

    @property
    def torch_dtype(self) -> str:
        return self.layer.torch_dtype

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @classmethod
    def from_target(cls, target_config: dict, *, aux_layers=None, num_hidden_layers: int = 1,
                    draft_vocab_size: int | None = None, **overrides) -> Eagle3Config:  # fmt: skip
        """Drafter config for a target; ``aux_layers`` defaults to vLLM's (2, L//2, L-3)."""
        n = target_config["num_hidden_layers"]
        aux = tuple(aux_layers) if aux_layers is not None else (2, n // 2, n - 3)
        return cls(EagleConfig.from_target(target_config, **overrides), aux, num_hidden_layers, draft_vocab_size)

    @property
    def head_rows(self) -> int:
        return self.draft_vocab_size or self.layer.vocab_size

    def check_target(self, target_config: Mapping) -> None:
        """ValueError when an aux layer does not exist in the target."""
        n = target_config.get("num_hidden_layers")
        if n is not None and max(self.aux_layers) >= n:
            raise ValueError(f"aux layer {max(self.aux_layers)} does not exist in a {n}-layer target")

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(config.json fields vLLM's eagle3 loader reads, family fields: none)."""
        hf, _ = self.layer.to_checkpoint()
        hf.update(num_hidden_layers=self.num_hidden_layers, num_aux_hidden_states=len(self.aux_layers),
                  draft_vocab_size=self.head_rows, target_hidden_size=self.layer.hidden_size)  # fmt: skip
        hf[_AUX] = list(self.aux_layers)
        return hf, {}

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> Eagle3Config:
        if fields:
            raise ValueError(f"unknown EAGLE-3 field(s) {', '.join(sorted(fields))}")
        aux = hf.get(_AUX) or (hf.get("eagle_config") or {}).get(_AUX)
        if not aux:
            raise ValueError(f"config.json lacks {_AUX}")
        if hf.get("num_aux_hidden_states", len(aux)) != len(aux):
            raise ValueError(f"num_aux_hidden_states={hf['num_aux_hidden_states']} but {len(aux)} aux layers")
        layer = EagleConfig.from_checkpoint({**hf, "num_hidden_layers": 1}, {})
        draft = hf.get("draft_vocab_size")
        draft = None if draft in (None, layer.vocab_size) else int(draft)
        return cls(layer, tuple(aux), int(hf.get("num_hidden_layers", 1)), draft)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The one weight-name map: checkpoint tensor name -> (shape, dtype)."""
        c = self.layer
        H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
        q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
        shapes: dict[str, tuple[int, ...]] = {"fc.weight": (H, len(self.aux_layers) * H), "norm.weight": (H,)}
        for i in range(self.num_hidden_layers):
            n_in = 2 * H if i == 0 else H
            p = f"layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (q, n_in),
                p + "self_attn.k_proj.weight": (kv, n_in),
                p + "self_attn.v_proj.weight": (kv, n_in),
                p + "self_attn.o_proj.weight": (H, q),
                p + "post_attention_layernorm.weight": (H,),
                p + "mlp.gate_proj.weight": (I, H),
                p + "mlp.up_proj.weight": (I, H),
                p + "mlp.down_proj.weight": (H, I),
            })  # fmt: skip
            if i == 0:
                shapes[p + "hidden_norm.weight"] = (H,)
        specs = {name: (shape, c.dtype) for name, shape in shapes.items()}
        if self.draft_vocab_size:
            specs.update({"lm_head.weight": ((self.draft_vocab_size, H), c.dtype),
                          "d2t": ((self.draft_vocab_size,), torch.int64), "t2d": ((c.vocab_size,), torch.bool)})  # fmt: skip
        return specs


class Eagle3Layer(nn.Module):
    """Layer 0 attends over [norm(embedding), norm(hidden)] (2H); later layers are plain pre-norm."""

    def __init__(self, s: LlamaLayerShape, first: bool) -> None:
        super().__init__()
        H = s.hidden_size
        self.first = first
        self.input_layernorm = RMSNorm(H, s.rms_norm_eps)
        if first:
            self.hidden_norm = RMSNorm(H, s.rms_norm_eps)
        self.self_attn = Attention(s, 2 * H if first else H)
        self.post_attention_layernorm = RMSNorm(H, s.rms_norm_eps)
        self.mlp = MLP(s)

    def attention_input(self, r: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.first:
            return torch.cat((self.input_layernorm(emb), self.hidden_norm(r)), dim=-1)
        return self.input_layernorm(r)

    def forward(self, r, x, cos, sin, attn_mask=None, kv_inputs=None) -> torch.Tensor:
        r = r + self.self_attn(x, cos, sin, attn_mask, kv_inputs)
        return r + self.mlp(self.post_attention_layernorm(r))


class Eagle3Drafter(nn.Module):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__()
        self.config = config
        H, s = config.hidden_size, config.layer.layer_shape()
        self.fc = nn.Linear(len(config.aux_layers) * H, H, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(s, i == 0) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(H, s.rms_norm_eps)
        if config.draft_vocab_size:  # frozen rows of the target's head, and their token ids
            self.register_buffer("draft_head", torch.zeros(config.draft_vocab_size, H))
            self.register_buffer("draft_ids", torch.arange(config.draft_vocab_size))

    def set_draft_vocab(self, token_ids: torch.Tensor, target_head: torch.Tensor) -> None:
        """Draft vocabulary = ``token_ids`` [Vd] (distinct target ids), head rows copied from the target's."""
        ids = token_ids.long().to(self.draft_ids.device)
        if ids.shape != self.draft_ids.shape or ids.unique().numel() != ids.numel():
            raise ValueError(f"draft vocabulary must be {self.draft_ids.numel()} distinct token ids")
        self.draft_ids.copy_(ids.sort().values)  # ascending, so d2t offsets are >= 0 as vLLM's are
        self.draft_head.copy_(target_head[self.draft_ids].to(self.draft_head.dtype))

    def logits(self, normed: torch.Tensor, head) -> torch.Tensor:
        """[..., H] -> [..., Vd] over the draft vocabulary (or [..., V] through the target's head)."""
        if self.config.draft_vocab_size is None:
            return head.logits(normed)
        return normed.to(head.lm_head.dtype) @ self.draft_head.to(head.lm_head.dtype).T

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """[..., kH] the target's aux hidden states -> [..., H] the step-1 hidden input g."""
        return self.fc(aux)

    def forward(
        self,
        input_embeds: torch.Tensor,  # [B, S, H] E[x_{t+1}]
        hidden: torch.Tensor,  # [B, S, H] g_t (step 1) or the previous step's pre-norm output
        positions: torch.Tensor,  # [B, S] or [S] RoPE positions t
        attn_mask: torch.Tensor | None = None,  # [B or 1, 1, S, S_k] bool, None = causal
        cache: list[list[torch.Tensor]] | None = None,  # per layer, attention inputs of earlier steps
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (norm(r) for the head, r fed to the next step)
        """One drafting step. With ``cache`` (HASS-style unrolling) each layer appends its
        attention input and reads keys/values from every step's input so far."""
        c = self.config.layer
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        r = hidden
        for i, layer in enumerate(self.layers):
            x = layer.attention_input(r, input_embeds)
            kv = None
            if cache is not None:
                cache[i].append(x)
                kv = cache[i]
            r = layer(r, x, cos, sin, attn_mask, kv)
        return self.norm(r), r

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {k: v for k, v in self.state_dict().items() if k not in ("draft_head", "draft_ids")}
        if self.config.draft_vocab_size:
            t2d = torch.zeros(self.config.layer.vocab_size, dtype=torch.bool)
            t2d[self.draft_ids] = True
            tensors.update({"lm_head.weight": self.draft_head, "t2d": t2d,
                            "d2t": self.draft_ids - torch.arange(len(self.draft_ids), device=self.draft_ids.device)})  # fmt: skip
        return tensors

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        if self.config.draft_vocab_size:
            d2t, t2d = tensors.pop("d2t"), tensors.pop("t2d")
            ids = d2t + torch.arange(len(d2t))
            if not torch.equal(t2d.nonzero().flatten(), ids):
                raise ValueError("d2t and t2d name different draft vocabularies")
            tensors.update(draft_head=tensors.pop("lm_head.weight"), draft_ids=ids)
        self.load_state_dict(tensors)


FAMILY = DrafterFamily(
    name="eagle3",
    config_cls=Eagle3Config,
    model_cls=Eagle3Drafter,
    serve=ServeSpec(method="eagle3", architecture=ARCHITECTURE),
    recipes={"eagle3": "vllm_coral.training.ttt:EAGLE3", "eagle3-csra": "vllm_coral.training.ttt:EAGLE3_CSRA"},
    description="EAGLE-3 feature drafter (fused low/mid/high target features, own norm), served by vLLM's eagle3",
)

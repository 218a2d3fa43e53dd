"""One Llama decoder layer in plain torch, numerically the layer vLLM runs in its EAGLE
drafters (``vllm/model_executor/models/llama_eagle.py``).

Computation for input x [B, S, H] (vLLM's layer 0 of an EAGLE drafter has no input norm)::

    a   = o_proj(attention(rope(q_proj x), rope(k_proj x), v_proj x))   # causal, GQA
    r   = x + a
    out = r + down_proj(silu(gate_proj n) * up_proj n),   n = rmsnorm(r)

Module names match the checkpoint names vLLM loads (``self_attn.q_proj``,
``mlp.gate_proj``, ``post_attention_layernorm``...), so ``state_dict()`` is the checkpoint.
RoPE is the default Llama rotation (rotate-half), computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "LlamaDecoderLayer", "LlamaLayerShape", "MLP", "RMSNorm", "rope_cos_sin"]


@dataclass(frozen=True)
class LlamaLayerShape:
    # Model width H; equals the target's hidden size for feature-level drafters.
    hidden_size: int
    # MLP width.
    intermediate_size: int
    # Query heads.
    num_attention_heads: int
    # Key/value heads (GQA); divides num_attention_heads.
    num_key_value_heads: int
    # Per-head width.
    head_dim: int
    # RMSNorm epsilon.
    rms_norm_eps: float
    # RoPE base.
    rope_theta: float

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(
    positions: torch.Tensor,  # [B, S] or [S] int
    head_dim: int,
    theta: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin [B or 1, S, head_dim] fp32
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    pos = positions.float()
    if pos.dim() == 1:
        pos = pos[None]
    freqs = pos[..., None] * inv_freq  # [B, S, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, heads, S, D]; cos/sin [B, S, D] -> broadcast over heads
    cos, sin = cos[:, None], sin[:, None]
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


class Attention(nn.Module):
    """GQA self-attention; ``input_size`` is the width it reads (EAGLE-3's layer 0 reads 2H)."""

    def __init__(self, s: LlamaLayerShape, input_size: int | None = None) -> None:
        super().__init__()
        self.s = s
        n_in = input_size or s.hidden_size
        self.q_proj = nn.Linear(n_in, s.num_attention_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(n_in, s.num_key_value_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(n_in, s.num_key_value_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_attention_heads * s.head_dim, s.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,  # [B, S, D]
        sin: torch.Tensor,  # [B, S, D]
        attn_mask: torch.Tensor | None,  # [B or 1, 1, S, S_k] bool (True = attend) or None = causal
        kv_inputs: list[torch.Tensor] | None = None,  # J x [B, S, H]; keys/values from each, S_k = J*S
    ) -> torch.Tensor:  # [B, S, H]
        B, S, _ = x.shape
        s = self.s
        q = self.q_proj(x).view(B, S, s.num_attention_heads, s.head_dim).transpose(1, 2)
        q = _apply_rope(q, cos, sin)
        ks, vs = [], []
        for src in kv_inputs if kv_inputs is not None else [x]:
            ks.append(_apply_rope(self.k_proj(src).view(B, S, s.num_key_value_heads, s.head_dim).transpose(1, 2), cos, sin))
            vs.append(self.v_proj(src).view(B, S, s.num_key_value_heads, s.head_dim).transpose(1, 2))
        k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        groups = s.num_attention_heads // s.num_key_value_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, s: LlamaLayerShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """A Llama layer without input norm (EAGLE layer 0), returning ``r + mlp(norm(r))``."""

    def __init__(self, s: LlamaLayerShape) -> None:
        super().__init__()
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        cos: torch.Tensor,  # [B, S, D]
        sin: torch.Tensor,  # [B, S, D]
        attn_mask: torch.Tensor | None = None,  # [B or 1, 1, S, S_k] bool, None = causal
        kv_inputs: list[torch.Tensor] | None = None,  # keys/values from these inputs (HASS)
    ) -> torch.Tensor:  # [B, S, H]
        r = x + self.self_attn(x, cos, sin, attn_mask, kv_inputs)
        return self.skip(r) + self.mlp(self.post_attention_layernorm(r))

    def skip(self, r: torch.Tensor) -> torch.Tensor:
        """The MLP's residual branch (FSPAD's PAD layer widens it to 2H)."""
        return r

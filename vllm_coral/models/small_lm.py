"""Small-LM drafter: a standalone few-layer Llama on the target's tokenizer, served by plain vLLM.

Source: Goel et al., "Direct Alignment of Draft Model for Speculative Decoding with
Chat-Fine-Tuned LLMs" (Qualcomm, 2024). Unlike the feature drafters it reads no target
hidden state: it is an ordinary causal LM with the target's vocabulary, so vLLM serves
it with ``"method": "draft_model"`` and no plugin. The torch model *is* transformers'
``LlamaForCausalLM`` (the architecture vLLM loads), so what we train is what vLLM runs.

The checkpoint is a plain Hugging Face folder: ``config.json`` (Llama fields, plus our
``vllm_coral`` block, which vLLM and transformers ignore), ``model.safetensors`` under HF
names (``model.embed_tokens.weight``, ``model.layers.{i}.*``, ``model.norm.weight``, and
``lm_head.weight`` only when the head is untied), and the target's tokenizer files.

Cost. A drafting step reads every weight once at batch 1, so its cost follows the
drafter's parameter count. SmolLM2-135M's tied 49152-row embedding is 28.3M of the
target's 134.5M parameters, so the head dominates a small drafter: measured in vLLM at
batch 1 (``benchmarks/bench_small_lm_step.py``, each model served alone), a decode step
of 1 / 2 / 4 layers at width 576 costs 0.26 / 0.28 / 0.31 of the target's, 2 / 4 layers
at width 288 0.16 / 0.21. transformers requires the width to be a multiple of the head
count (SmolLM2: 9).

Initialisation from the target (:func:`init_from_target`). At the target's width, the
drafter takes the target's embedding, final norm and a subset of its layers verbatim.
Narrower (width h < H), every tensor is projected onto the top-h principal directions of
the target's embedding: P [H, h] holds the right singular vectors of E [V, H] with the
largest singular values, so E' = E P keeps most of the embedding's energy, and since the
head is tied, logits' = E' x' ~ E (P x'). Weights reading the residual stream become
W P, weights writing it P^T W. The RMSNorm scales become diag(P^T diag(w) P) times
sqrt(H / h): a projected vector keeps most of its norm over fewer channels, so its RMS
grows by about sqrt(H / h). Attention keeps the target's heads and head_dim (q/k/v
project h -> heads * head_dim), so the attention maps themselves are unchanged.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from vllm_coral.models.eagle import EagleConfig
from vllm_coral.models.registry import DrafterFamily, ServeSpec, save_drafter

__all__ = ["ARCHITECTURE", "FAMILY", "TOKENIZER_FILES", "SmallLMConfig", "SmallLMDrafter", "default_init_layers",
           "init_from_target", "save_small_lm", "small_lm_tensor_specs"]  # fmt: skip

ARCHITECTURE = "LlamaForCausalLM"
# Files copied from the target into every checkpoint, so the folder is a complete HF model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")  # fmt: skip
# Tensors of one decoder layer: name -> which side of the residual stream it touches.
_LAYER_TENSORS = {
    "input_layernorm.weight": "norm",
    "self_attn.q_proj.weight": "reads",
    "self_attn.k_proj.weight": "reads",
    "self_attn.v_proj.weight": "reads",
    "self_attn.o_proj.weight": "writes",
    "post_attention_layernorm.weight": "norm",
    "mlp.gate_proj.weight": "reads",
    "mlp.up_proj.weight": "reads",
    "mlp.down_proj.weight": "writes",
}


@dataclass(frozen=True)
class SmallLMConfig:
    # The vocabulary is the target's; the width may differ.
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = ("vocab_size",)
    # Shape of every decoder layer, vocabulary, RoPE and dtype (hidden_size is the drafter's).
    layer: EagleConfig
    # Decoder layers.
    num_hidden_layers: int = 2
    # Whether the LM head is the embedding (as the target's, when it is tied).
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")

    @property
    def torch_dtype(self) -> str:
        return self.layer.torch_dtype

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.layer.vocab_size

    @classmethod
    def from_target(cls, target_config: Mapping, *, num_hidden_layers: int = 2, hidden_size: int | None = None,
                    **layer_overrides) -> SmallLMConfig:  # fmt: skip
        """The target's layer shape and vocabulary, ``num_hidden_layers`` deep, optionally narrower."""
        if hidden_size is not None:
            layer_overrides["hidden_size"] = hidden_size
        layer = EagleConfig.from_target(dict(target_config), **layer_overrides)
        return cls(layer, num_hidden_layers, bool(target_config.get("tie_word_embeddings", True)))

    def hf_config(self) -> dict:
        """The Llama config.json fields (what vLLM and transformers read)."""
        hf, _ = self.layer.to_checkpoint()
        hf.update(num_hidden_layers=self.num_hidden_layers, tie_word_embeddings=self.tie_word_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": self.layer.rope_theta})  # fmt: skip
        return hf

    def to_checkpoint(self) -> tuple[dict, dict]:
        return self.hf_config(), {}

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> SmallLMConfig:
        if fields:
            raise ValueError(f"unknown small-LM field(s) {', '.join(sorted(fields))}")
        layers = hf.get("num_hidden_layers")
        if not isinstance(layers, int):
            raise ValueError("config.json lacks num_hidden_layers")
        layer = EagleConfig.from_checkpoint({**hf, "num_hidden_layers": 1}, {})
        return cls(layer, layers, bool(hf.get("tie_word_embeddings", False)))

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return small_lm_tensor_specs(self)


def small_lm_tensor_specs(c: SmallLMConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The one weight-name map (transformers' and vLLM's Llama names) -> (shape, dtype)."""
    L = c.layer
    H, I, V = L.hidden_size, L.intermediate_size, L.vocab_size
    q, kv = L.num_attention_heads * L.head_dim, L.num_key_value_heads * L.head_dim
    per_layer = {
        "input_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (q, H),
        "self_attn.k_proj.weight": (kv, H),
        "self_attn.v_proj.weight": (kv, H),
        "self_attn.o_proj.weight": (H, q),
        "post_attention_layernorm.weight": (H,),
        "mlp.gate_proj.weight": (I, H),
        "mlp.up_proj.weight": (I, H),
        "mlp.down_proj.weight": (H, I),
    }
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(c.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    return {name: (shape, L.dtype) for name, shape in shapes.items()}


class SmallLMDrafter(nn.Module):
    """transformers' ``LlamaForCausalLM`` with the checkpoint interface of a drafter family."""

    def __init__(self, config: SmallLMConfig) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.config = config
        hf = {k: v for k, v in config.hf_config().items() if k not in ("torch_dtype", "rope_theta")}
        self.lm = LlamaForCausalLM(LlamaConfig(**hf, use_cache=False))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S] token ids -> [B, S, H] final-norm output
        # causal attention; right padding cannot reach earlier positions, so no mask is needed
        return self.lm.model(input_ids=ids, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., V]
        return hidden @ self.lm.lm_head.weight.to(hidden.dtype).T

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        state = self.lm.state_dict()
        specs = self.config.tensor_specs()
        return {name: state[name] for name in specs}

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing, unexpected = self.lm.load_state_dict(dict(tensors), strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(f"small-LM tensors: missing {missing}, unexpected {unexpected}")


def default_init_layers(target_layers: int, n: int) -> tuple[int, ...]:
    """The target's first ``n`` layers (30, 2 -> (0, 1)): an early exit of the target.

    Measured on SmolLM2's held-out conversations before any training (1,462 positions):
    first layers (0, 1) KD 17.9 nats, (0, 1, 2, 3) 17.5; the last ones (28, 29) 18.7; the
    first and last (0, 29) 61.9, because layer 29 expects the residual stream of 29 layers."""
    if not 1 <= n <= target_layers:
        raise ValueError(f"cannot take {n} of the target's {target_layers} layers")
    return tuple(range(n))


def _projection(embed: torch.Tensor, width: int) -> torch.Tensor:
    """[H, width]: the top-``width`` right singular vectors of the embedding [V, H]."""
    _, vecs = torch.linalg.eigh(embed.double().T @ embed.double())  # ascending eigenvalues
    return vecs[:, -width:].flip(-1).to(embed.dtype)


def init_from_target(config: SmallLMConfig, target_state: Mapping[str, torch.Tensor],
                     layers: Sequence[int]) -> dict[str, torch.Tensor]:  # fmt: skip
    """Drafter tensors (``small_lm_tensor_specs`` names) taken from the target's state dict
    (HF names): its embedding, final norm and ``layers``, projected when narrower (module docstring)."""
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"{len(layers)} init layers for a {config.num_hidden_layers}-layer drafter")
    embed = target_state["model.embed_tokens.weight"].float()
    H, h = embed.shape[1], config.hidden_size
    if h > H:
        raise ValueError(f"drafter width {h} exceeds the target's {H}")
    P = _projection(embed, h) if h < H else torch.eye(H)
    gain = math.sqrt(H / h)

    def project(tensor: torch.Tensor, side: str) -> torch.Tensor:
        t = tensor.float()
        if side == "reads":
            return t @ P
        if side == "writes":
            return P.T @ t
        return (P**2).T @ t * gain  # norm

    out = {"model.embed_tokens.weight": embed @ P, "model.norm.weight": project(target_state["model.norm.weight"], "norm")}
    for i, src in enumerate(layers):
        for name, side in _LAYER_TENSORS.items():
            key = f"model.layers.{src}.{name}"
            if key not in target_state:
                raise ValueError(f"the target has no {key}")
            out[f"model.layers.{i}.{name}"] = project(target_state[key], side)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = target_state.get("lm_head.weight", target_state["model.embed_tokens.weight"]).float() @ P
    return out


def save_small_lm(drafter: SmallLMDrafter, folder: str | Path, target_dir: str | Path | None, *,
                  dtype: str = "float32", recipe: str = "small-lm", training: Mapping | None = None) -> Path:  # fmt: skip
    """The drafter's checkpoint in ``dtype`` (weights cast on save; the model is untouched),
    plus the target's tokenizer files from ``target_dir`` (None: none copied)."""
    config = replace(drafter.config, layer=replace(drafter.config.layer, torch_dtype=dtype))
    written = SimpleNamespace(config=config, checkpoint_tensors=drafter.checkpoint_tensors)
    folder = save_drafter(written, folder, family="small_lm", recipe=recipe, training=training)
    for name in TOKENIZER_FILES if target_dir is not None else ():
        if (Path(target_dir) / name).is_file():
            shutil.copyfile(Path(target_dir) / name, folder / name)
    return folder


FAMILY = DrafterFamily(
    name="small_lm",
    config_cls=SmallLMConfig,
    model_cls=SmallLMDrafter,
    serve=ServeSpec(method="draft_model", architecture=ARCHITECTURE),
    recipes={"small-lm": "vllm_coral.training.direct_align:DISTILL"},
    description="standalone few-layer Llama on the target's tokenizer (direct alignment), served by draft_model",
)

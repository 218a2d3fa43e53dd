"""EAGLE drafter: numerics against transformers' Llama layer, its config and weight map.
Checkpoint round trips and bad checkpoints: tests/models/test_registry.py."""

from __future__ import annotations

import pytest
import torch

from vllm_coral.models.eagle import EagleConfig, EagleDrafter, eagle_tensor_specs
from vllm_coral.models.target import TargetHead

TINY_TARGET = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "max_position_embeddings": 512,
}


def _drafter(seed=0) -> EagleDrafter:
    torch.manual_seed(seed)
    model = EagleDrafter(EagleConfig.from_target(TINY_TARGET))
    with torch.no_grad():  # RMSNorm weights start at 1; perturb so the test sees them
        model.layers[0].post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return model


def test_layer_matches_transformers_llama_layer():
    """Our layer == transformers' LlamaDecoderLayer with the input norm removed, which is
    vLLM's EAGLE layer 0 (llama_eagle.py replaces input_layernorm with Identity)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    model = _drafter()
    cfg = LlamaConfig(**{k: v for k, v in TINY_TARGET.items()}, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    hf = LlamaDecoderLayer(cfg, layer_idx=0)
    missing, unexpected = hf.load_state_dict(
        {k.removeprefix("layers.0."): v for k, v in model.state_dict().items() if k.startswith("layers.0.")},
        strict=False,
    )
    assert missing == ["input_layernorm.weight"] and unexpected == []
    hf.input_layernorm = torch.nn.Identity()

    x = torch.randn(2, 7, 64)
    pos = torch.arange(3, 10)[None].expand(2, -1)
    cos_sin = LlamaRotaryEmbedding(cfg)(x, pos)
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    want = hf(x, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
    want = want[0] if isinstance(want, tuple) else want
    from vllm_coral.models.llama_layer import rope_cos_sin

    cos, sin = rope_cos_sin(pos, 16, 10000.0)
    got = model.layers[0](x, cos, sin)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_forward_shapes_and_causality():
    model = _drafter()
    emb, feat = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    out = model(emb, feat, torch.arange(6))
    assert out.shape == (1, 6, 64)
    # Changing the last position's inputs must not change earlier outputs.
    feat2 = feat.clone()
    feat2[0, -1] += 1.0
    out2 = model(emb, feat2, torch.arange(6))
    torch.testing.assert_close(out[:, :-1], out2[:, :-1])
    assert not torch.allclose(out[:, -1], out2[:, -1])


def test_config_validation():
    with pytest.raises(ValueError, match="not a multiple"):
        EagleConfig.from_target({**TINY_TARGET, "num_key_value_heads": 3})
    hf, fields = EagleConfig.from_target(TINY_TARGET).to_checkpoint()
    assert EagleConfig.from_checkpoint(hf, fields) == EagleConfig.from_target(TINY_TARGET)
    with pytest.raises(ValueError, match="unknown EAGLE field"):
        EagleConfig.from_checkpoint(hf, {"bogus": 1})
    with pytest.raises(ValueError, match="exactly 1"):
        EagleConfig.from_checkpoint({**hf, "num_hidden_layers": 2}, {})


def test_tensor_map_matches_module(tmp_path):
    model = _drafter()
    specs = eagle_tensor_specs(model.config)
    assert {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()} == specs


def test_target_head_of_the_real_target(target_path):
    head = TargetHead.load(target_path)
    assert head.embed.shape == (49152, 576)
    assert head.lm_head.data_ptr() == head.embed.data_ptr()  # SmolLM2 ties them
    assert not head.embed.requires_grad

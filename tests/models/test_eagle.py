"""EAGLE drafter: numerics against transformers' Llama layer, checkpoint round trip, and
one-line errors for every kind of bad checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.eagle import EagleConfig, EagleDrafter, eagle_tensor_shapes
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


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = _drafter()
    model.save(tmp_path / "ckpt", extra={"target": "tiny"})
    hf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert hf["architectures"] == ["EagleLlamaForCausalLM"] and hf["num_hidden_layers"] == 1
    assert hf["vllm_coral"]["target"] == "tiny"
    loaded = EagleDrafter.load(tmp_path / "ckpt", target_config=TINY_TARGET)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = torch.randn(1, 4, 64)
    torch.testing.assert_close(model(x, x, torch.arange(4)), loaded(x, x, torch.arange(4)), atol=0, rtol=0)


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("fc.weight"), "missing tensor(s) fc.weight"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor(s) extra"),
        (lambda t: t.update({"fc.weight": torch.zeros(64, 64)}), "fc.weight has shape [64, 64], expected [64, 128]"),
    ],
)
def test_bad_tensors_are_refused_in_one_line(tmp_path, edit, message):
    _drafter().save(tmp_path)
    _edit_tensors(tmp_path, edit)
    with pytest.raises(CheckpointError) as exc:
        EagleDrafter.load(tmp_path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_truncated_weights_are_refused(tmp_path):
    _drafter().save(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        EagleDrafter.load(tmp_path)


def test_wrong_target_is_refused(tmp_path):
    _drafter().save(tmp_path)
    with pytest.raises(CheckpointError, match="hidden_size=64 does not match the target's hidden_size=576"):
        EagleDrafter.load(tmp_path, target_config={"hidden_size": 576, "vocab_size": 300})


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        EagleDrafter.load(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        EagleDrafter.load(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="not a multiple"):
        EagleConfig.from_target({**TINY_TARGET, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="unknown EagleConfig field"):
        EagleConfig.from_dict({**EagleConfig.from_target(TINY_TARGET).to_dict(), "bogus": 1})


def test_tensor_map_matches_module(tmp_path):
    model = _drafter()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == eagle_tensor_shapes(model.config)


def test_target_head_of_the_real_target(target_path):
    head = TargetHead.load(target_path)
    assert head.embed.shape == (49152, 576)
    assert head.lm_head.data_ptr() == head.embed.data_ptr()  # SmolLM2 ties them
    assert not head.embed.requires_grad

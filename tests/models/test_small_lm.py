"""The small-LM drafter: a transformers Llama with the drafter-family checkpoint interface.

- Initialised from all 30 of the target's layers it *is* the target: logits equal to
  transformers' own SmolLM2 (the copy and the config fields are right).
- Narrower, the projection is orthonormal and keeps the embedding's top principal
  directions (hand-checked on a rank-2 embedding).
- Checkpoints round-trip, omit the tied head, and are refused with one line for another
  vocabulary or a missing tensor.
"""

from __future__ import annotations

import json

import pytest
import torch

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.registry import load_drafter, save_drafter, validate_drafter
from vllm_coral.models.small_lm import (
    SmallLMConfig,
    SmallLMDrafter,
    _projection,
    default_init_layers,
    init_from_target,
)

TINY = {"hidden_size": 36, "intermediate_size": 48, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 8, "vocab_size": 80, "num_hidden_layers": 4, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0}, "tie_word_embeddings": True}  # fmt: skip


def _tiny_target_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    target = SmallLMDrafter(SmallLMConfig.from_target(TINY, num_hidden_layers=4))
    return {k: v.clone() for k, v in target.lm.state_dict().items()}


@pytest.mark.slow
def test_all_layers_from_the_target_reproduce_the_target(target_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((target_path / "config.json").read_text())
    drafter = SmallLMDrafter(SmallLMConfig.from_target(config, num_hidden_layers=config["num_hidden_layers"]))
    state = load_file(str(target_path / "model.safetensors"))
    drafter.load_checkpoint_tensors(init_from_target(drafter.config, state, range(config["num_hidden_layers"])))
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 339, 2]])
    with torch.no_grad():
        want = target(ids).logits
        got = drafter.logits(drafter(ids))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_first_layers_are_the_default():
    assert default_init_layers(30, 2) == (0, 1)
    with pytest.raises(ValueError, match="cannot take 31"):
        default_init_layers(30, 31)


def test_projection_keeps_the_top_principal_directions():
    """E = a u1 v1^T + b u2 v2^T with a > b: the width-1 projection is ±v1, width 2 spans {v1, v2}."""
    v = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0].float()
    u = torch.linalg.qr(torch.randn(10, 2, dtype=torch.float64))[0].float()
    embed = 5.0 * u[:, :1] @ v[:, :1].T + 2.0 * u[:, 1:] @ v[:, 1:2].T
    p1 = _projection(embed, 1)
    assert abs(float(p1[:, 0] @ v[:, 0])) == pytest.approx(1.0, abs=1e-5)
    p2 = _projection(embed, 2)
    torch.testing.assert_close(p2.T @ p2, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close((embed @ p2) @ p2.T, embed, atol=1e-4, rtol=0)  # rank 2: nothing lost


def test_narrow_init_projects_every_tensor():
    state = _tiny_target_state()
    config = SmallLMConfig.from_target(TINY, num_hidden_layers=2, hidden_size=24)
    tensors = init_from_target(config, state, (0, 3))
    specs = config.tensor_specs()
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: s for k, (s, _) in specs.items()}
    P = _projection(state["model.embed_tokens.weight"], 24)
    torch.testing.assert_close(tensors["model.layers.1.mlp.up_proj.weight"], state["model.layers.3.mlp.up_proj.weight"] @ P)
    torch.testing.assert_close(tensors["model.layers.0.self_attn.o_proj.weight"],
                               P.T @ state["model.layers.0.self_attn.o_proj.weight"])  # fmt: skip
    with pytest.raises(ValueError, match="2 init layers for a 3-layer"):
        init_from_target(SmallLMConfig.from_target(TINY, num_hidden_layers=3), state, (0, 1))


def test_checkpoint_round_trip_and_errors(tmp_path):
    state = _tiny_target_state()
    config = SmallLMConfig.from_target(TINY, num_hidden_layers=2)
    drafter = SmallLMDrafter(config)
    drafter.load_checkpoint_tensors(init_from_target(config, state, (1, 2)))
    folder = save_drafter(drafter, tmp_path / "d", family="small_lm", recipe="small-lm")
    hf = json.loads((folder / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["num_hidden_layers"] == 2
    loaded, ckpt = load_drafter(folder, TINY)
    assert ckpt.family.serve.method == "draft_model"
    assert "lm_head.weight" not in loaded.checkpoint_tensors()  # tied: vLLM and transformers tie it back
    ids = torch.tensor([[3, 7, 11, 5]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(loaded(ids)), drafter.logits(drafter(ids)))
    with pytest.raises(CheckpointError, match="vocab_size=80 does not match the target's vocab_size=81"):
        validate_drafter(folder, {**TINY, "vocab_size": 81})
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor.*model.layers.1.mlp.down_proj.weight"):
        validate_drafter(folder)

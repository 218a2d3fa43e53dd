"""EAGLE-3 drafter: its weight map (the names vLLM's eagle3 loader reads), its config
round trip, its residual semantics, and that training-time-test unrolling computes exactly
what drafting step j computes at inference. Numerics against vLLM itself:
tests/vllm/test_eagle3_vllm.py."""

from __future__ import annotations

import pytest
import torch

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.eagle3 import Eagle3Config, Eagle3Drafter
from vllm_coral.models.registry import load_drafter, save_drafter, validate_drafter
from vllm_coral.training.ttt import ttt_steps

from .test_eagle import TINY_TARGET

TARGET = {**TINY_TARGET, "num_hidden_layers": 8}


def _drafter(layers: int = 1, seed: int = 0) -> Eagle3Drafter:
    torch.manual_seed(seed)
    model = Eagle3Drafter(Eagle3Config.from_target(TARGET, num_hidden_layers=layers))
    with torch.no_grad():  # norms start at 1; perturb so the tests see them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def test_default_aux_layers_are_vllms_low_mid_high():
    assert Eagle3Config.from_target(TARGET).aux_layers == (2, 4, 5)
    assert Eagle3Config.from_target({**TARGET, "num_hidden_layers": 30}).aux_layers == (2, 15, 27)


@pytest.mark.parametrize("layers", [1, 2])
def test_weight_map_is_the_models_state_and_vllms_names(layers):
    model = _drafter(layers)
    specs = model.config.tensor_specs()
    assert {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()} == specs
    H = TARGET["hidden_size"]
    assert specs["fc.weight"][0] == (H, 3 * H) and specs["layers.0.self_attn.q_proj.weight"][0] == (64, 2 * H)
    assert "layers.0.hidden_norm.weight" in specs and "norm.weight" in specs
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in specs)  # vLLM shares the target's
    if layers == 2:
        assert specs["layers.1.self_attn.q_proj.weight"][0] == (64, H) and "layers.1.hidden_norm.weight" not in specs


def test_round_trip_and_the_fields_vllm_reads(tmp_path):
    model = _drafter(2)
    path = save_drafter(model, tmp_path / "d", family="eagle3", recipe="eagle3")
    loaded, ckpt = load_drafter(path, TARGET)
    assert ckpt.config == model.config and ckpt.family.serve.method == "eagle3"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    hf, _ = model.config.to_checkpoint()
    assert hf["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and hf["num_aux_hidden_states"] == 3
    assert hf["num_hidden_layers"] == 2 and hf["draft_vocab_size"] == hf["vocab_size"]


def test_an_aux_layer_the_target_lacks_is_refused_in_one_line(tmp_path):
    path = save_drafter(_drafter(), tmp_path / "d", family="eagle3", recipe="eagle3")
    with pytest.raises(CheckpointError, match=r"aux layer 5 does not exist in a 4-layer target"):
        validate_drafter(path, {**TARGET, "num_hidden_layers": 4})
    with pytest.raises(CheckpointError, match="vocab_size=300 does not match the target's vocab_size=301"):
        validate_drafter(path, {**TARGET, "vocab_size": 301})


def test_the_residual_is_the_hidden_input_not_the_attention_input():
    """vLLM's layer 0: residual = hidden (before hidden_norm); attention reads [ln(e), hn(h)]."""
    model = _drafter()
    with torch.no_grad():  # silence attention and MLP: what is left is the residual path
        model.layers[0].self_attn.o_proj.weight.zero_()
        model.layers[0].mlp.down_proj.weight.zero_()
    emb, hidden = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    normed, prenorm = model(emb, hidden, torch.arange(5))
    torch.testing.assert_close(prenorm, hidden)
    torch.testing.assert_close(normed, model.norm(hidden))


@pytest.mark.parametrize("layers", [1, 2])
def test_unrolled_step_j_equals_inference_drafting_step_j(layers):
    """Step j at index t == the drafter run as vLLM drafts: indices <= t-j+1 verified (fed
    g, the fused target features) and the next j-1 each fed the previous index's output."""
    model = _drafter(layers).eval()
    S, unroll = 9, 4
    emb, g = torch.randn(1, S, 64), torch.randn(1, S, 64)
    with torch.no_grad():
        steps = {j: prenorm for j, _, prenorm in ttt_steps(model, emb, g, unroll, detach=True)}
        for j in range(1, unroll + 1):
            for t in range(j - 1, S):
                verified = t - j + 1
                hidden = g[:, : verified + 1]
                for n in range(verified + 1, t + 1):  # draft positions, one forward each
                    _, out = model(emb[:, :n], hidden, torch.arange(n))
                    hidden = torch.cat([hidden, out[:, -1:]], dim=1)
                _, out = model(emb[:, : t + 1], hidden, torch.arange(t + 1))
                torch.testing.assert_close(steps[j][:, t], out[:, t], atol=2e-5, rtol=1e-5)


def test_draft_vocabulary_round_trips_in_vllms_layout(tmp_path):
    torch.manual_seed(0)
    model = Eagle3Drafter(Eagle3Config.from_target(TARGET, draft_vocab_size=5))
    W = torch.randn(300, 64)
    model.set_draft_vocab(torch.tensor([7, 3, 250, 11, 0]), W)
    tensors = model.checkpoint_tensors()
    assert tensors["d2t"].tolist() == [0, 2, 5, 8, 246]  # target id - draft id, ids ascending
    assert tensors["t2d"].nonzero().flatten().tolist() == [0, 3, 7, 11, 250]
    assert torch.equal(tensors["lm_head.weight"], W[[0, 3, 7, 11, 250]])
    path = save_drafter(model, tmp_path / "d", family="eagle3", recipe="eagle3")
    loaded, ckpt = load_drafter(path, TARGET)
    assert ckpt.config.draft_vocab_size == 5 and torch.equal(loaded.draft_ids, model.draft_ids)
    h = torch.randn(2, 64)
    torch.testing.assert_close(loaded.logits(h, _Head(W)), h @ W[[0, 3, 7, 11, 250]].T)
    with pytest.raises(ValueError, match="5 distinct token ids"):
        model.set_draft_vocab(torch.tensor([1, 1, 2, 3, 4]), W)


def test_inconsistent_draft_vocabulary_is_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    model = Eagle3Drafter(Eagle3Config.from_target(TARGET, draft_vocab_size=5))
    model.set_draft_vocab(torch.arange(5), torch.randn(300, 64))
    path = save_drafter(model, tmp_path / "d", family="eagle3", recipe="eagle3")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["t2d"][299] = True
    tensors["t2d"][0] = False
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="d2t and t2d name different draft vocabularies"):
        load_drafter(path, TARGET)


class _Head:
    def __init__(self, W):
        self.lm_head = W

"""CORAL drafter: the routed head against dense logits restricted to the chosen groups,
the proposal distribution it implies, checkpoint round trip, and one-line errors for a
checkpoint whose group map or router does not match."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.coral import (
    CoralConfig,
    CoralDrafter,
    coral_tensor_specs,
    routed_logits,
    routed_top_tokens,
    select_groups,
)
from vllm_coral.models.eagle import EagleConfig, EagleDrafter
from vllm_coral.models.registry import load_drafter, save_drafter
from vllm_coral.models.vocab_groups import partition_vocab

TINY = EagleConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=8, vocab_size=103)  # fmt: skip  # 103 = prime: ragged last group


def _save(model, path):
    family = "coral" if isinstance(model, CoralDrafter) else "eagle"
    return save_drafter(model, path, family=family, recipe="coral-router" if family == "coral" else "eagle")


def _coral(strategy="kmeans", n=8, k=2, seed=0) -> CoralDrafter:
    torch.manual_seed(seed)
    head = torch.randn(TINY.vocab_size, TINY.hidden_size)
    part = partition_vocab(strategy, n, lm_head=head, token_counts=torch.randint(0, 9, (TINY.vocab_size,)))
    model = CoralDrafter.from_eagle(EagleDrafter(TINY), part, k)
    with torch.no_grad():
        model.router.w2.bias.normal_()
    return model


@pytest.mark.parametrize("strategy", ["contiguous", "frequency", "kmeans"])
@pytest.mark.parametrize("n,k", [(8, 1), (8, 3), (5, 5)])
def test_routed_logits_equal_dense_restricted_to_chosen_groups(strategy, n, k):
    torch.manual_seed(n * 10 + k)
    model = _coral(strategy, n, k)
    W = torch.randn(TINY.vocab_size, TINY.hidden_size)
    h = torch.randn(6, TINY.hidden_size)
    groups = select_groups(model.router(h), k)
    part = model.partition
    got = routed_logits(h, part.grouped_weight(W), groups, part.group_size, part.row_to_token)
    dense = h @ W.T
    chosen = (part.token_to_group()[None, :, None] == groups[:, None, :]).any(-1)  # [T, V]
    want = torch.where(chosen, dense, torch.full_like(dense, float("-inf")))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the proposal q: the dense softmax renormalised over the chosen groups, 0 elsewhere
    q = got.softmax(-1)
    p = dense.softmax(-1) * chosen
    torch.testing.assert_close(q, p / p.sum(-1, keepdim=True))
    # greedy drafting without [T, V] logits picks the same tokens
    top = routed_top_tokens(h, part.grouped_weight(W), groups, part.group_size, part.row_to_token)
    assert torch.equal(top, got.argmax(-1))
    if k == n:  # every group chosen: exactly the dense head
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    model = _coral()
    _save(model, tmp_path / "c")
    hf = json.loads((tmp_path / "c" / "config.json").read_text())
    assert hf["architectures"] == ["EagleCoralLlamaForCausalLM"]
    assert hf["vllm_coral"]["config"] == {"num_groups": 8, "top_k": 2, "partition": "kmeans"}
    back, ckpt = load_drafter(tmp_path / "c", {"hidden_size": 32, "vocab_size": 103})
    assert ckpt.family.name == "coral" and ckpt.recipe == "coral-router" and ckpt.config == model.config
    assert torch.equal(back.partition.row_to_token, model.partition.row_to_token)
    for (name, a), b in zip(model.checkpoint_tensors().items(), back.checkpoint_tensors().values()):
        assert torch.equal(a, b), name
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == coral_tensor_specs(model.config)


def _tamper(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.__setitem__("vocab_groups.row_to_token", torch.zeros(103, dtype=torch.int64)),
         "bad group map vocab_groups.row_to_token .*not a permutation"),
        (lambda t: t.__setitem__("vocab_groups.row_to_token", torch.arange(103, dtype=torch.int32)),
         "row_to_token is I32, expected I64"),
        (lambda t: t.__setitem__("router.w2.weight", torch.zeros(16, 32)), r"router.w2.weight has shape \[16, 32\]"),
        (lambda t: t.pop("router.w1.weight"), "missing tensor.*router.w1.weight"),
        (lambda t: t.pop("vocab_groups.row_to_token"), "missing tensor.*row_to_token"),
        (lambda t: t.__setitem__("router.extra", torch.zeros(1)), "unexpected tensor.*router.extra"),
    ],
)  # fmt: skip
def test_mismatched_group_map_or_router_is_refused_in_one_line(tmp_path, edit, message):
    _save(_coral(), tmp_path / "c")
    _tamper(tmp_path / "c", edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load_drafter(tmp_path / "c")
    assert "\n" not in str(e.value)


def test_config_disagreeing_with_tensors_is_refused(tmp_path):
    _save(_coral(n=8), tmp_path / "c")
    cfg_file = tmp_path / "c" / "config.json"
    hf = json.loads(cfg_file.read_text())
    hf["vllm_coral"]["config"]["num_groups"] = 4  # router still has 8 outputs
    cfg_file.write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=r"router.w2.weight has shape \[8, 32\], expected \[4, 32\]"):
        load_drafter(tmp_path / "c")


def test_wrong_target_and_wrong_family_are_refused(tmp_path):
    _save(_coral(), tmp_path / "c")
    with pytest.raises(CheckpointError, match="vocab_size=103 does not match the target's vocab_size=49152"):
        load_drafter(tmp_path / "c", {"hidden_size": 32, "vocab_size": 49152})
    # an EAGLE checkpoint relabelled as CORAL: the architecture no longer matches the family
    _save(EagleDrafter(TINY), tmp_path / "e")
    hf = json.loads((tmp_path / "e" / "config.json").read_text())
    hf["vllm_coral"]["family"] = "coral"
    (tmp_path / "e" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="do not match family 'coral'"):
        load_drafter(tmp_path / "e")


def test_config_validation():
    with pytest.raises(ValueError, match="top_k"):
        CoralConfig(TINY, num_groups=4, top_k=5, partition="kmeans")
    with pytest.raises(ValueError, match="unknown partition"):
        CoralConfig(TINY, num_groups=4, top_k=1, partition="hash")

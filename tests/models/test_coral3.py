"""CORAL on EAGLE-3: the routed head over the drafter's head rows (draft vocabulary or the
whole vocabulary) against its dense logits, checkpoint round trip through the registry,
and one-line errors for a checkpoint whose row map does not fit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.coral import select_groups
from vllm_coral.models.coral3 import Coral3Config, Coral3Drafter
from vllm_coral.models.eagle import EagleConfig
from vllm_coral.models.eagle3 import Eagle3Config, Eagle3Drafter
from vllm_coral.models.registry import load_drafter, save_drafter
from vllm_coral.models.vocab_groups import partition_vocab

LAYER = EagleConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    vocab_size=103)  # fmt: skip
TARGET = {"hidden_size": 32, "vocab_size": 103, "num_hidden_layers": 6}


def _coral3(draft_vocab=None, n=8, k=2, strategy="kmeans", seed=0):
    torch.manual_seed(seed)
    target_head = torch.randn(LAYER.vocab_size, LAYER.hidden_size)
    body = Eagle3Drafter(Eagle3Config(LAYER, (1, 3, 4), 1, draft_vocab))
    if draft_vocab:
        body.set_draft_vocab(torch.randperm(LAYER.vocab_size)[:draft_vocab], target_head)
    rows = body.draft_head if draft_vocab else target_head
    part = partition_vocab(strategy, n, lm_head=rows, token_counts=torch.randint(0, 9, (rows.shape[0],)))
    model = Coral3Drafter.from_eagle3(body, part, k)
    with torch.no_grad():
        model.router.w2.bias.normal_()
    return model, target_head


@pytest.mark.parametrize("draft_vocab", [None, 43])
@pytest.mark.parametrize("n,k", [(8, 1), (5, 5)])
def test_routed_logits_are_the_dense_head_restricted_to_the_chosen_groups(draft_vocab, n, k):
    model, target_head = _coral3(draft_vocab, n, k)
    normed = torch.randn(7, LAYER.hidden_size)
    got = model.routed_logits(normed, target_head)  # [T, R]
    rows = model.head_weight(target_head)
    assert got.shape == (7, rows.shape[0])
    dense = normed @ rows.T
    groups = select_groups(model.router(normed), k)
    chosen = (model.partition.token_to_group()[None, :, None] == groups[:, None, :]).any(-1)
    torch.testing.assert_close(got, torch.where(chosen, dense, torch.full_like(dense, float("-inf"))),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    if k == n:  # every group: the dense head itself
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("draft_vocab", [None, 43])
def test_checkpoint_round_trip(draft_vocab, tmp_path):
    model, _ = _coral3(draft_vocab)
    path = save_drafter(model, tmp_path / "c3", family="coral3", recipe="coral-router")
    loaded, ckpt = load_drafter(path, TARGET)
    assert ckpt.family.name == "coral3" and ckpt.speculative_config(3)["method"] == "eagle3"
    assert ckpt.config == model.config and torch.equal(loaded.partition.row_to_token, model.partition.row_to_token)
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), name


def test_bad_row_map_and_config_fail_in_one_line(tmp_path):
    model, _ = _coral3(43)
    path = save_drafter(model, tmp_path / "c3", family="coral3", recipe="coral-router")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["vocab_groups.row_to_token"][:2] = 0  # not a permutation of the 43 head rows
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"bad group map vocab_groups.row_to_token \(row_to_token is not a perm"):
        load_drafter(path, TARGET)
    with pytest.raises(CheckpointError, match="aux layer 4 does not exist in a 3-layer target"):
        load_drafter(path, {**TARGET, "num_hidden_layers": 3})
    with pytest.raises(ValueError, match=r"num_groups must be in \[1, head rows=43\]"):
        Coral3Config(model.config.eagle3, 44, 1, "frequency")

"""Feature extraction: the assistant-token mask, sharding, and resume after a kill."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_coral.training.features import encode_conversation, extract_features, iter_shards

CONVS = [
    {"id": f"c{i}", "messages": [
        {"role": "user", "content": f"Question number {i}?"},
        {"role": "assistant", "content": f"Answer {i}."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Done."},
    ]}
    for i in range(5)
]  # fmt: skip


def test_mask_covers_exactly_the_assistant_text(target_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_path)
    ids, mask = encode_conversation(tok, CONVS[0]["messages"])
    masked = tok.decode([t for t, m in zip(ids, mask) if m])
    assert masked == "Answer 0.<|im_end|>\nDone.<|im_end|>\n"
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "Question number 0?" in unmasked and "Answer" not in unmasked


def test_shards_and_resume(target_path, tmp_path):
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(c) + "\n" for c in CONVS) + "{cut")
    out = tmp_path / "feats"
    first = extract_features(target_path, src, out, dtype="float32", shard_tokens=100)
    index = json.loads((out / "index.json").read_text())
    assert first["conversations"] == 5 and len(index["shards"]) >= 2
    before = [s for s in iter_shards(out)]

    # Kill after the first shard: later shards vanish from the index (and disk).
    for entry in index["shards"][1:]:
        (out / entry["file"]).unlink()
    index["shards"] = index["shards"][:1]
    (out / "index.json").write_text(json.dumps(index))
    extract_features(target_path, src, out, dtype="float32", shard_tokens=100)
    after = [s for s in iter_shards(out)]
    assert len(after) == len(before)
    for a, b in zip(before, after):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
        torch.testing.assert_close(a.hidden, b.hidden)
    total = sum(len(s.offsets) - 1 for s in after)
    assert total == 5

    with pytest.raises(ValueError, match="holds features made with"):
        extract_features(target_path, src, out, dtype="bfloat16")


def test_hidden_states_are_post_norm_last_layer(target_path, tmp_path):
    """Stored features equal the final-norm output, i.e. what the LM head consumes:
    logits from them reproduce the model's own logits."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps(CONVS[0]) + "\n")
    extract_features(target_path, src, tmp_path / "f", dtype="float32")
    (shard,) = list(iter_shards(tmp_path / "f"))
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(shard.input_ids[None].long()).logits[0]
    torch.testing.assert_close(shard.hidden @ model.lm_head.weight.T, logits, atol=1e-4, rtol=1e-4)


def test_aux_layers_are_the_residual_stream_entering_those_layers(target_path, tmp_path):
    """aux layer i = transformers' hidden_states[i] (i layers done, before the final norm),
    the value vLLM's EagleModelMixin hands an eagle3 drafter for layer id i."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_coral.training.dataset import FeatureDataset

    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps(CONVS[0]) + "\n")
    out = tmp_path / "feats"
    extract_features(target_path, src, out, dtype="float32", aux_layers=(2, 15, 27))
    data = FeatureDataset(out, 1024, 576, aux=True)
    batch = data.collate([0], torch.Generator())
    ids, _ = encode_conversation(AutoTokenizer.from_pretrained(target_path), CONVS[0]["messages"])
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch.cat([hs[2][0], hs[15][0], hs[27][0]], -1)
    assert batch.aux.shape == (1, len(ids), 3 * 576) and data.aux_layers == (2, 15, 27)
    torch.testing.assert_close(batch.aux[0], want)
    assert not torch.allclose(hs[27][0], batch.feats[0])  # aux is pre-norm, feats post-norm
    assert FeatureDataset(out, 1024, 576).collate([0], torch.Generator()).aux is None  # aux only when asked
    with pytest.raises(ValueError, match="no aux-layer features"):
        FeatureDataset(_plain(target_path, tmp_path), 1024, 576, aux=True)
    with pytest.raises(ValueError, match=r"must be in \[0, 30\)"):
        extract_features(target_path, src, tmp_path / "bad", aux_layers=(30,))


def _plain(target_path, tmp_path):
    src = tmp_path / "plain.jsonl"
    src.write_text(json.dumps(CONVS[1]) + "\n")
    extract_features(target_path, src, tmp_path / "plain", dtype="float32")
    return tmp_path / "plain"


def test_compute_dtype_runs_the_target_in_it_and_is_recorded(target_path, tmp_path):
    """bf16 features come from the target run in bf16 (what a bf16 deployment hands the
    drafter): close to the fp32 ones but not equal; the folder records the choice, so
    resuming with another compute dtype is refused."""
    src = tmp_path / "train.jsonl"
    src.write_text(json.dumps(CONVS[0]) + "\n")
    extract_features(target_path, src, tmp_path / "f32", dtype="float32")
    extract_features(target_path, src, tmp_path / "bf16", dtype="float32", compute_dtype="bfloat16")
    (a,), (b,) = iter_shards(tmp_path / "f32"), iter_shards(tmp_path / "bf16")
    assert not torch.equal(a.hidden, b.hidden)
    assert torch.nn.functional.cosine_similarity(a.hidden, b.hidden, dim=-1).min() > 0.99
    config = json.loads((tmp_path / "bf16" / "index.json").read_text())["config"]
    assert config["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in json.loads((tmp_path / "f32" / "index.json").read_text())["config"]
    with pytest.raises(ValueError, match="holds features made with"):
        extract_features(target_path, src, tmp_path / "bf16", dtype="float32")

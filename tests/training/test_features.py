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

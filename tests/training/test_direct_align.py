"""Direct-alignment training of the small-LM drafter on real SmolLM2 features.

- Every loss (KD, TVD, TVD++, CE) lowers the drafter's TVD to the target on the data it
  trains on: the losses are wired to the right distributions and positions.
- TVD++'s tokens are drawn from q (frequencies within sampling error of q on a small
  vocabulary) and repeat with the batch's generator (what makes --resume bit-identical).
- The exported folder is a complete HF model (tokenizer included), in the dtype asked
  for, and a later stage continues from it; a shape mismatch is one clear line.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from vllm_coral.models.registry import validate_drafter
from vllm_coral.models.target import TargetHead
from vllm_coral.training.dataset import FeatureDataset
from vllm_coral.training.direct_align import DISTILL, DirectAlignConfig, _sample, build_small_lm
from vllm_coral.training.evaluate import evaluate
from vllm_coral.training.loop import LoopConfig, run

LOOP = LoopConfig(epochs=3, batch_tokens=512, lr=1e-3, warmup_steps=2, save_every=1000, log_every=1000)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["kd", "tvd", "tvdpp", "ce"])
def test_every_loss_brings_the_drafter_closer_to_the_target(loss, target_path, tiny_features, tmp_path):
    cfg = DirectAlignConfig(loss=loss, layers=1)
    head = TargetHead.load(target_path)
    data = FeatureDataset(tiny_features, LOOP.max_seq_len, head.hidden_size)
    torch.manual_seed(LOOP.seed)
    before = evaluate(DISTILL, cfg, build_small_lm(cfg, head, data), head, tiny_features)
    summary = run(DISTILL, cfg, LOOP, target_path, tiny_features, tmp_path / "run", progress=False,
                  heldout=tiny_features)  # fmt: skip
    after = summary["eval"]
    print(f"{loss}: tvd {before['loss/tvd']:.3f} -> {after['loss/tvd']:.3f}, "
          f"top-1 {before['acc/top1']:.3f} -> {after['acc/top1']:.3f}")  # fmt: skip
    assert after["loss/tvd"] < before["loss/tvd"] - 0.05


def test_tvdpp_tokens_follow_q_and_repeat():
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    draws = _sample(q, 20000, torch.Generator().manual_seed(1))
    freq = torch.stack([torch.bincount(row, minlength=5) for row in draws]).float() / 20000
    assert (freq - q).abs().max() < 0.015  # 3.5 standard errors of the largest (p = 0.5)
    assert torch.equal(draws, _sample(q, 20000, torch.Generator().manual_seed(1)))


@pytest.mark.slow
def test_export_is_a_complete_model_that_a_later_stage_continues(target_path, tiny_features, tmp_path):
    cfg = DirectAlignConfig(loss="ce", layers=1, checkpoint_dtype="bfloat16")
    loop = replace(LOOP, epochs=1, max_steps=2)
    run(DISTILL, cfg, loop, target_path, tiny_features, tmp_path / "a", progress=False)
    folder = tmp_path / "a" / "drafter"
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
    assert validate_drafter(folder).config.torch_dtype == "bfloat16"
    summary = run(DISTILL, replace(cfg, loss="kd", init=str(folder)), loop, target_path, tiny_features,
                  tmp_path / "b", progress=False)  # fmt: skip
    assert summary["steps"] == 2
    head = TargetHead.load(target_path)
    data = FeatureDataset(tiny_features, 64, head.hidden_size)
    with pytest.raises(ValueError, match="1 layers of width 576, but --layers 2"):
        build_small_lm(replace(cfg, init=str(folder), layers=2), head, data)

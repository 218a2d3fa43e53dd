"""CORAL training: CSRA in the unrolled trainer (its gradient reaches the drafter), and the
router trainer (its target, that it learns, its held-out metrics, resume, checkpoints that
load)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from vllm_coral.models.coral import CoralDrafter, routed_top_tokens, select_groups
from vllm_coral.models.eagle import EagleDrafter
from vllm_coral.models.target import TargetHead
from vllm_coral.training.router import RouterTrainConfig, train_router
from vllm_coral.training.trainer import TrainConfig, _step_losses, train


def test_coral_preset_is_hass_plus_csra():
    coral, hass = TrainConfig.for_method("coral"), TrainConfig.for_method("hass")
    assert (coral.unroll, coral.topk_weight) == (hass.unroll, hass.topk_weight)
    assert (coral.csra_weight, coral.csra_temperature) == (0.1, 0.1) and hass.csra_weight == 0.0
    with pytest.raises(ValueError, match="needs unroll >= 2"):
        TrainConfig.for_method("eagle", csra_weight=0.1)


def test_csra_term_changes_the_gradient(target_path, tiny_features):
    """Same batch, same weights: the CORAL loss = HASS loss + 0.1 * csra, and its gradient differs."""
    from vllm_coral.models.eagle import EagleConfig
    from vllm_coral.training.trainer import _collate, load_sequences

    head = TargetHead.load(target_path)
    seqs = load_sequences(tiny_features, 64, head.hidden_size)
    ids, mask, feats = _collate(seqs, [0, 1], "cpu")
    noise = torch.zeros(ids.shape[0], ids.shape[1] - 1, feats.shape[-1])
    grads, totals = {}, {}
    for method in ("hass", "coral"):
        torch.manual_seed(0)
        drafter = EagleDrafter(EagleConfig.from_target(head.config))
        total, terms = _step_losses(TrainConfig.for_method(method), drafter, head, ids, mask, feats, noise)
        total.backward()
        grads[method] = drafter.fc.weight.grad.clone()
        totals[method] = (total.item(), terms)
    hass_total, _ = totals["hass"]
    coral_total, terms = totals["coral"]
    assert terms["loss/csra"] > 0
    assert coral_total == pytest.approx(hass_total + 0.1 * terms["loss/csra"], rel=1e-5)
    assert not torch.allclose(grads["hass"], grads["coral"])


@pytest.mark.slow
def test_train_coral_writes_a_drafter(target_path, tiny_features, tmp_path):
    cfg = TrainConfig.for_method("coral", max_steps=3, batch_tokens=256, save_every=3, warmup_steps=1, epochs=2)
    summary = train(target_path, tiny_features, tmp_path / "run", cfg, progress=False)
    assert summary["steps"] == 3 and "loss/csra" in summary["last"]
    EagleDrafter.load(tmp_path / "run" / "drafter", target_config=TargetHead.load(target_path).config)


@pytest.fixture(scope="module")
def small_drafter(target_path, tiny_features, tmp_path_factory):
    out = tmp_path_factory.mktemp("coral_drafter")
    cfg = TrainConfig.for_method("coral", max_steps=4, batch_tokens=256, save_every=4, warmup_steps=1, epochs=2)
    train(target_path, tiny_features, out, cfg, progress=False)
    return out / "drafter"


@pytest.mark.slow
def test_router_training_learns_and_metrics_are_true(target_path, tiny_features, small_drafter, tmp_path):
    cfg = RouterTrainConfig(partitions=("frequency", "kmeans"), num_groups=(8,), top_k=(1, 2), epochs=8,
                            batch_tokens=512, lr=5e-3, warmup_steps=1, save_every=100)  # fmt: skip
    # "held-out" = the training features: this checks fitting, not generalisation
    untrained = train_router(target_path, small_drafter, tiny_features, tmp_path / "r0", replace(cfg, max_steps=0),
                             heldout_features=tiny_features, progress=False)  # fmt: skip
    trained = train_router(target_path, small_drafter, tiny_features, tmp_path / "r", cfg,
                           heldout_features=tiny_features, progress=False)  # fmt: skip
    for key in ("frequency-n8-k1", "kmeans-n8-k2"):
        assert trained["heldout"][key]["mass"] > untrained["heldout"][key]["mass"] + 0.05, key
    for key, m in trained["heldout"].items():
        assert 0.0 <= m["mass"] <= 1.0 and 0.0 <= m["target_top1"] <= 1.0
    assert len(trained["checkpoints"]) == 4
    table = (tmp_path / "r" / "router_metrics.md").read_text()
    assert "| kmeans | 8 | 2 | 25.0% |" in table and table.count("\n| ") == 4

    # draft_top1 = how often the routed greedy draft equals the dense one: recompute it directly
    head = TargetHead.load(target_path)
    coral = CoralDrafter.load(tmp_path / "r" / "kmeans-n8-k1", target_config=head.config)
    from vllm_coral.training.router import _router_batches
    from vllm_coral.training.trainer import _collate, load_sequences

    seqs = load_sequences(tiny_features, 1024, head.hidden_size)
    ids, mask, feats = _collate(seqs, list(range(len(seqs))), "cpu")
    with torch.no_grad():
        h, _, _ = _router_batches(coral.body, head, ids, mask, feats, 3)
        part = coral.partition
        routed = routed_top_tokens(h, part.grouped_weight(head.lm_head), select_groups(coral.router(h), 1),
                                   part.group_size, part.row_to_token)  # fmt: skip
    same = (routed == head.logits(h).argmax(-1)).float().mean().item()
    assert same == pytest.approx(trained["heldout"]["kmeans-n8-k1"]["draft_top1"], abs=1e-6)


@pytest.mark.slow
def test_router_resume_is_bit_identical(target_path, tiny_features, small_drafter, tmp_path):
    import os

    torch.set_num_threads(1)
    try:
        cfg = RouterTrainConfig(num_groups=(4,), top_k=(1,), epochs=4, batch_tokens=256, save_every=2, warmup_steps=1,
                                max_steps=6)  # fmt: skip
        train_router(target_path, small_drafter, tiny_features, tmp_path / "full", cfg, progress=False)
        part = replace(cfg, max_steps=2)
        train_router(target_path, small_drafter, tiny_features, tmp_path / "cut", part, progress=False)
        # simulate the cut run being restarted with the full config
        state = tmp_path / "cut" / "router_state.json"
        import json

        meta = json.loads(state.read_text())
        meta["config"]["max_steps"] = 6
        state.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="pass --resume"):
            train_router(target_path, small_drafter, tiny_features, tmp_path / "cut", cfg, progress=False)
        summary = train_router(target_path, small_drafter, tiny_features, tmp_path / "cut", cfg, resume=True,
                               progress=False)  # fmt: skip
        assert summary["start_step"] == 2
        a = load_file(str(tmp_path / "full" / "router_state.safetensors"))
        b = load_file(str(tmp_path / "cut" / "router_state.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


@pytest.mark.slow
def test_train_coral_router_cli(target_path, tiny_features, small_drafter, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "vllm_coral.cli", "train", "coral-router", "--target", str(target_path),
            "--drafter", str(small_drafter), "--features", str(tiny_features)]  # fmt: skip
    proc = subprocess.run(base + ["--out", str(tmp_path / "r"), "--num-groups", "4", "--top-k", "1", "--max-steps", "1",
                                  "--heldout-features", str(tiny_features)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"drafter: {tmp_path / 'r' / 'frequency-n4-k1'}" in proc.stdout
    assert "frequency-n4-k1: held-out mass" in proc.stdout
    CoralDrafter.load(tmp_path / "r" / "frequency-n4-k1")
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--num-groups", "4", "--top-k", "4"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "vllm-coral: error: every top_k must be in [1, N)" in bad.stderr

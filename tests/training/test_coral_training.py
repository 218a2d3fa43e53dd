"""CORAL training: CSRA in the unrolled trainer (its gradient reaches the drafter), and the
router trainer (its target, that it learns, its held-out metrics, resume, checkpoints that
load)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_coral.models.coral import routed_top_tokens, select_groups
from vllm_coral.models.eagle import EagleConfig, EagleDrafter
from vllm_coral.models.registry import load_drafter, read_drafter, validate_drafter
from vllm_coral.models.target import TargetHead
from vllm_coral.training.dataset import FeatureDataset
from vllm_coral.training.loop import LoopConfig, run
from vllm_coral.training.router import ROUTER, RouterConfig, router_inputs
from vllm_coral.training.unrolled import CORAL, CSRA, EAGLE, HASS

ROUTER_LOOP = LoopConfig(**ROUTER.loop_defaults)


def train_router(target, drafter, features, out, cfg: RouterConfig, loop: LoopConfig, *, heldout_features=None,
                 resume=False):  # fmt: skip
    cfg = replace(cfg, drafter=str(drafter))
    return run(ROUTER, cfg, loop, target, features, out, resume=resume, progress=False, heldout=heldout_features)


def test_coral_preset_is_hass_plus_csra():
    coral, hass = CORAL.preset, HASS.preset
    assert replace(coral, csra=None) == hass and coral.csra == CSRA(weight=0.1, temperature=0.1)
    assert hass.unroll == 3 and hass.topk.k == 10 and EAGLE.preset.topk is None
    with pytest.raises(ValueError, match="needs unroll >= 2"):
        replace(EAGLE.preset, csra=CSRA())


def test_csra_term_changes_the_gradient(target_path, tiny_features):
    """Same batch, same weights: the CORAL loss = HASS loss + 0.1 * csra, and its gradient differs."""
    head = TargetHead.load(target_path)
    data = FeatureDataset(tiny_features, 64, head.hidden_size)
    grads, totals = {}, {}
    for recipe in (HASS, CORAL):
        method = recipe.name
        torch.manual_seed(0)
        drafter = EagleDrafter(EagleConfig.from_target(head.config))
        batch = data.collate([0, 1], torch.Generator().manual_seed(0))
        total, terms = recipe.loss(replace(recipe.preset, noise_std=0.0), drafter, head, batch)
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
    loop = LoopConfig(max_steps=3, batch_tokens=256, save_every=3, warmup_steps=1, epochs=2)
    summary = run(CORAL, CORAL.preset, loop, target_path, tiny_features, tmp_path / "run", progress=False)
    assert summary["steps"] == 3 and "loss/csra" in summary["last"]
    ckpt = validate_drafter(tmp_path / "run" / "drafter", TargetHead.load(target_path).config)
    assert (ckpt.family.name, ckpt.recipe) == ("eagle", "coral")


def test_warm_start_loads_the_checkpoint_and_refuses_another_family(target_path, tiny_features):
    """--init: CORAL starts from the committed 12K EAGLE drafter's weights; an FSPAD checkpoint is refused."""
    root = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m"
    head = TargetHead.load(target_path)
    data = FeatureDataset(tiny_features, 64, head.hidden_size)
    drafter = CORAL.build(replace(CORAL.preset, init=str(root / "eagle-12k")), head, data)
    eagle, _ = load_drafter(root / "eagle-12k", head.config)
    for name, tensor in eagle.state_dict().items():
        assert torch.equal(drafter.state_dict()[name], tensor), name
    fresh = CORAL.build(CORAL.preset, head, data)
    assert not torch.equal(fresh.fc.weight, eagle.fc.weight)
    with pytest.raises(ValueError, match="a fspad drafter, but this recipe trains eagle drafters"):
        HASS.build(replace(HASS.preset, init=str(root / "fspad")), head, data)


@pytest.mark.slow
def test_warm_start_checkpoint_records_what_it_continued(target_path, tiny_features, tmp_path, monkeypatch):
    """The exported drafter names the checkpoint it started from, as a portable path; a
    cold start records none."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    loop = LoopConfig(max_steps=1, batch_tokens=256, save_every=1, warmup_steps=1, epochs=1)
    warm = replace(CORAL.preset, init=str(root / "checkpoints" / "smollm2-135m" / "eagle-12k"))
    run(CORAL, warm, loop, target_path, tiny_features, tmp_path / "warm", progress=False)
    assert read_drafter(tmp_path / "warm" / "drafter").training["init"] == "checkpoints/smollm2-135m/eagle-12k"
    run(CORAL, CORAL.preset, loop, target_path, tiny_features, tmp_path / "cold", progress=False)
    assert "init" not in read_drafter(tmp_path / "cold" / "drafter").training


@pytest.fixture(scope="module")
def small_drafter(target_path, tiny_features, tmp_path_factory):
    out = tmp_path_factory.mktemp("coral_drafter")
    loop = LoopConfig(max_steps=4, batch_tokens=256, save_every=4, warmup_steps=1, epochs=2)
    run(CORAL, CORAL.preset, loop, target_path, tiny_features, out, progress=False)
    return out / "drafter"


@pytest.mark.slow
def test_router_training_learns_and_metrics_are_true(target_path, tiny_features, small_drafter, tmp_path):
    cfg = RouterConfig(partitions=("frequency", "kmeans"), num_groups=(8,), top_k=(1, 2))
    loop = replace(ROUTER_LOOP, epochs=8, batch_tokens=512, lr=5e-3, warmup_steps=1, save_every=100)
    # "held-out" = the training features: this checks fitting, not generalisation
    untrained = train_router(target_path, small_drafter, tiny_features, tmp_path / "r0", cfg, replace(loop, max_steps=0),
                             heldout_features=tiny_features)  # fmt: skip
    trained = train_router(target_path, small_drafter, tiny_features, tmp_path / "r", cfg, loop,
                           heldout_features=tiny_features)  # fmt: skip
    for key in ("frequency-n8-k1", "kmeans-n8-k2"):
        assert trained["heldout"][key]["mass"] > untrained["heldout"][key]["mass"] + 0.05, key
    for key, m in trained["heldout"].items():
        assert 0.0 <= m["mass"] <= 1.0 and 0.0 <= m["target_top1"] <= 1.0
    assert len(trained["checkpoints"]) == 4
    table = (tmp_path / "r" / "router_metrics.md").read_text()
    assert "| kmeans | 8 | 2 | 25.0% |" in table and table.count("\n| ") == 4

    # draft_top1 = how often the routed greedy draft equals the dense one: recompute it directly
    head = TargetHead.load(target_path)
    coral, _ = load_drafter(tmp_path / "r" / "kmeans-n8-k1", head.config)
    data = FeatureDataset(tiny_features, 1024, head.hidden_size)
    with torch.no_grad():
        h, _, _ = router_inputs(coral.body, head, data.collate(list(range(len(data))), torch.Generator()), 3)
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
        cfg = RouterConfig(num_groups=(4,), top_k=(1,))
        loop = replace(ROUTER_LOOP, epochs=4, batch_tokens=256, save_every=2, warmup_steps=1, max_steps=6)
        train_router(target_path, small_drafter, tiny_features, tmp_path / "full", cfg, loop)
        train_router(target_path, small_drafter, tiny_features, tmp_path / "cut", cfg, replace(loop, max_steps=2))
        # simulate the cut run being restarted with the full config
        state = tmp_path / "cut" / "trainer_state.json"
        import json

        meta = json.loads(state.read_text())
        meta["loop"]["max_steps"] = 6
        state.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="pass --resume"):
            train_router(target_path, small_drafter, tiny_features, tmp_path / "cut", cfg, loop)
        with pytest.raises(ValueError, match="different recipe_config"):
            train_router(target_path, small_drafter, tiny_features, tmp_path / "cut", replace(cfg, unroll=2), loop,
                         resume=True)  # fmt: skip
        summary = train_router(target_path, small_drafter, tiny_features, tmp_path / "cut", cfg, loop, resume=True)
        assert summary["start_step"] == 2
        a = load_file(str(tmp_path / "full" / "trainer_state.safetensors"))
        b = load_file(str(tmp_path / "cut" / "trainer_state.safetensors"))
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
    assert validate_drafter(tmp_path / "r" / "frequency-n4-k1").family.name == "coral"
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--num-groups", "4", "--top-k", "4"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "vllm-coral: error: every top_k must be in [1, N)" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("draft_vocab", [None, 512])
def test_router_on_an_eagle3_drafter_writes_coral3_checkpoints(target_path, tiny_features, tmp_path, draft_vocab):
    """The same recipe routes an EAGLE-3 drafter: its inputs are the drafter's normed
    outputs over training-time-test steps (read from the aux features), its groups
    partition the drafter's head rows (the draft vocabulary when it has one), and it writes
    coral3 checkpoints whose routed greedy draft is the metric's ``draft_top1``."""
    from vllm_coral.models.coral3 import Coral3Drafter
    from vllm_coral.training.router import draft_logits
    from vllm_coral.training.ttt import EAGLE3

    loop = LoopConfig(max_steps=2, batch_tokens=256, save_every=2, warmup_steps=1)
    run(EAGLE3, replace(EAGLE3.preset, draft_vocab=draft_vocab), loop, target_path, tiny_features, tmp_path / "e3",
        progress=False)  # fmt: skip
    cfg = RouterConfig(partitions=("frequency",), num_groups=(8,), top_k=(1,), unroll=2)
    rloop = replace(ROUTER_LOOP, max_steps=3, batch_tokens=512, warmup_steps=1)
    summary = train_router(target_path, tmp_path / "e3" / "drafter", tiny_features, tmp_path / "r", cfg, rloop,
                           heldout_features=tiny_features)  # fmt: skip
    head = TargetHead.load(target_path)
    coral, ckpt = load_drafter(tmp_path / "r" / "frequency-n8-k1", head.config)
    rows = draft_vocab or head.vocab_size
    assert isinstance(coral, Coral3Drafter) and ckpt.family.name == "coral3" and ckpt.recipe == "coral-router"
    assert coral.partition.vocab_size == rows
    assert f"| frequency | 8 | 1 | {-(-rows // 8) / rows:.1%} |" in (tmp_path / "r" / "router_metrics.md").read_text()
    data = FeatureDataset(tiny_features, 1024, head.hidden_size, aux=True)
    with torch.no_grad():
        h, _, _ = router_inputs(coral.body, head, data.collate(list(range(len(data))), torch.Generator()), 2)
        routed = coral.routed_logits(h, head.lm_head).argmax(-1)
        same = (routed == draft_logits(coral.body, h, head).argmax(-1)).float().mean().item()
    assert same == pytest.approx(summary["heldout"]["frequency-n8-k1"]["draft_top1"], abs=1e-6)

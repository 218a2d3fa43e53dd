"""Trainer: HASS's attention layout against a step-by-step simulation of drafting, resume
after a kill (bit-identical to an uninterrupted run), and the DDP path under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from vllm_coral.models.eagle import EagleConfig, EagleDrafter
from vllm_coral.training.trainer import TrainConfig, hass_attention_mask


def test_hass_mask_worked_example():
    # j=2, S=3: t=0 -> key 0 of step 2; t=1 -> key 0 of step 1, key 1 of step 2;
    # t=2 -> keys 0, 1 of step 1, key 2 of step 2. Columns: step-1 keys 0..2, step-2 keys 0..2.
    want = torch.tensor(
        [[0, 0, 0, 1, 0, 0],
         [1, 0, 0, 0, 1, 0],
         [1, 1, 0, 0, 0, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(hass_attention_mask(3, 2), want)
    assert torch.equal(hass_attention_mask(4, 1), torch.ones(4, 4, dtype=torch.bool).tril())


def test_unrolled_steps_equal_sequential_drafting():
    """Step j's output at index t must be what drafting produces: run the layer on the
    sequence inference would have in its KV cache (target-feature inputs for the verified
    prefix, then the j-1 draft inputs) and compare its last output."""
    torch.manual_seed(0)
    cfg = EagleConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, vocab_size=50)  # fmt: skip
    drafter = EagleDrafter(cfg).eval()
    S, steps = 7, 3
    emb, feats = torch.randn(1, S, 32), torch.randn(1, S, 32)
    pos = torch.arange(S)
    inputs, outputs = [], []
    with torch.no_grad():
        for j in range(1, steps + 1):
            own = feats if j == 1 else torch.cat([feats[:, :1], outputs[-1][:, :-1]], dim=1)
            x = drafter.layer_input(emb, own)
            inputs.append(x)
            mask = None if j == 1 else hass_attention_mask(S, j)[None, None]
            outputs.append(drafter.run_layer(x, pos, mask, inputs if j > 1 else None))
        for j in range(1, steps + 1):
            for t in range(j - 1, S):
                seq = torch.stack([inputs[max(1, j - (t - s)) - 1][0, s] for s in range(t + 1)])[None]
                want = drafter.run_layer(seq, pos[: t + 1])[0, -1]
                torch.testing.assert_close(outputs[j - 1][0, t], want, atol=1e-5, rtol=1e-5)


def _train_cmd(target_path, features, out, *extra, method="eagle"):
    return [sys.executable, "-m", "vllm_coral.cli", "train", method, "--target", str(target_path),
            "--features", str(features), "--out", str(out), "--batch-tokens", "256",
            "--max-steps", "8", "--save-every", "2", "--warmup-steps", "2", "--epochs", "3", *extra]  # fmt: skip


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(target_path, tiny_features, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same summation order in both runs
    full = tmp_path / "full"
    subprocess.run(_train_cmd(target_path, tiny_features, full, method="hass"), check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(target_path, tiny_features, killed, method="hass"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    state = killed / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not (state.exists() and json.loads(state.read_text())["step"] >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint before the run ended"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped_at = json.loads(state.read_text())["step"]
    assert stopped_at < 8, "the run finished before it could be killed"

    again = subprocess.run(_train_cmd(target_path, tiny_features, killed, "--resume", method="hass"), env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(str(full / "trainer_state.safetensors"))
    b = load_file(str(killed / "trainer_state.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads(state.read_text())["step"] == 8

    # Without --resume an existing run is refused, not overwritten.
    refused = subprocess.run(_train_cmd(target_path, tiny_features, killed, method="hass"), env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert refused.returncode == 2 and "pass --resume" in refused.stderr


@pytest.mark.slow
def test_ddp_under_torchrun(target_path, tiny_features, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "ddp"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "vllm_coral.cli", "train", "eagle",
           "--target", str(target_path), "--features", str(tiny_features), "--out", str(out),
           "--batch-tokens", "256", "--max-steps", "3", "--save-every", "3", "--warmup-steps", "1",
           "--epochs", "3"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / "trainer_state.json").read_text())
    assert meta["step"] == 3 and meta["world_size"] == 2
    # Both ranks stepped the same averaged gradients: rank 0's saved weights are a
    # finite, trained drafter that loads.
    model = EagleDrafter.load(out / "drafter")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_config_validation():
    with pytest.raises(ValueError, match="method must be"):
        TrainConfig(method="medusa")
    assert TrainConfig.for_method("hass").unroll == 3 and TrainConfig.for_method("hass").topk_weight == 1.0

"""The training loop and the unrolled recipes: HASS's attention layout against a step-by-step
simulation of drafting, device/autocast/backend selection, resume after a kill
(bit-identical to an uninterrupted run), the DDP path under torchrun, and the streaming
feature dataset."""

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
from vllm_coral.models.registry import load_drafter
from vllm_coral.training.dataset import FeatureDataset
from vllm_coral.training.loop import LoopConfig, select_runtime
from vllm_coral.training.unrolled import hass_attention_mask


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
    model, _ = load_drafter(out / "drafter")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "device, dtype, env, cuda, bf16, want",
    [
        ("auto", "auto", {}, False, None, ("cpu", None, None)),
        ("auto", "auto", {}, True, True, ("cuda:0", torch.bfloat16, None)),
        ("auto", "auto", {}, True, False, ("cuda:0", None, None)),
        ("cpu", "auto", {}, True, True, ("cpu", None, None)),
        ("cpu", "bfloat16", {}, False, None, ("cpu", torch.bfloat16, None)),
        ("cuda", "float32", {}, True, True, ("cuda:0", None, None)),
        ("auto", "auto", {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, True, True, ("cuda:1", torch.bfloat16, "nccl")),
        ("cpu", "auto", {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, True, True, ("cpu", None, "gloo")),
    ],
)  # fmt: skip
def test_runtime_selection(device, dtype, env, cuda, bf16, want):
    rt = select_runtime(device, dtype, env=env, cuda_available=cuda, bf16_supported=bf16)
    assert (str(rt.device), rt.autocast_dtype, rt.backend) == want
    assert rt.world == int(env.get("WORLD_SIZE", 1)) and rt.rank == int(env.get("RANK", 0))


def test_runtime_refuses_what_the_machine_lacks():
    with pytest.raises(ValueError, match="no CUDA device"):
        select_runtime("cuda", "auto", env={}, cuda_available=False)
    with pytest.raises(ValueError, match="does not support bfloat16"):
        select_runtime("cuda", "bfloat16", env={}, cuda_available=True, bf16_supported=False)
    with pytest.raises(ValueError, match="device must be"):
        LoopConfig(device="tpu")


def test_autocast_follows_the_runtime():
    rt = select_runtime("cpu", "bfloat16", env={}, cuda_available=False)
    with rt.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with select_runtime("cpu", "float32", env={}, cuda_available=False).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_dataset_streams_hidden_states_from_the_shards(target_path, tiny_features):
    from safetensors import safe_open

    data = FeatureDataset(tiny_features, 1024, 576)
    assert len(data) == 12 and not data._handles  # nothing but ids/masks read so far
    ids, mask = data.tokens(3)
    item = data.items[3]
    with safe_open(str(data.files[item.shard]), framework="pt") as f:
        want = f.get_tensor("hidden")[item.start : item.start + item.length]
    assert torch.equal(data.hidden(3), want) and len(ids) == len(mask) == item.length
    batch = data.collate([3, 5], torch.Generator())
    assert batch.feats.shape == (2, max(data.items[3].length, data.items[5].length), 576)
    with pytest.raises(ValueError, match=r"expected \[\d+, 640\]"):
        FeatureDataset(tiny_features, 1024, 640)


def test_dataset_refuses_a_truncated_shard(tiny_features, tmp_path):
    import shutil

    copy = tmp_path / "f"
    shutil.copytree(tiny_features, copy)
    shard = sorted(copy.glob("shard_*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable feature shard"):
        FeatureDataset(copy, 1024, 576)


def test_a_data_fraction_is_a_nested_seeded_subset(tiny_features):
    full = FeatureDataset(tiny_features, 1024, 576)
    half = FeatureDataset(tiny_features, 1024, 576, fraction=0.5, seed=3)
    quarter = FeatureDataset(tiny_features, 1024, 576, fraction=0.25, seed=3)
    assert (len(full), len(half), len(quarter)) == (12, 6, 3)
    assert set(quarter.items) < set(half.items) < set(full.items)
    assert set(FeatureDataset(tiny_features, 1024, 576, fraction=0.5, seed=4).items) != set(half.items)
    # The draft vocabulary of a subset comes from the subset's own tokens.
    want = sum(torch.bincount(ids[mask > 0].long(), minlength=49152) for ids, mask in map(quarter.tokens, range(3)))
    assert torch.equal(quarter.token_counts(49152), want)
    assert quarter.token_counts(49152).sum() < full.token_counts(49152).sum()
    with pytest.raises(ValueError, match=r"data_fraction must be in \(0, 1\], got 0"):
        LoopConfig(data_fraction=0)


@pytest.mark.slow
def test_data_fraction_trains_on_fewer_batches(target_path, tiny_features, tmp_path):
    """Same steps asked for, a quarter of the conversations: fewer batches per epoch, so
    the run ends at its (smaller) epoch budget; a run saved before a loop field or a recipe
    knob existed resumes (each counts as its default), and one that differs is still refused."""
    out = tmp_path / "q"
    proc = subprocess.run(_train_cmd(target_path, tiny_features, out, "--data-fraction", "0.25", "--max-steps", "100")
                          + ["--epochs", "1"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["loop"]["data_fraction"] == 0.25 and 1 <= state["step"] <= 3  # 3 of 12 conversations, 256 tokens
    full = tmp_path / "full"
    subprocess.run(_train_cmd(target_path, tiny_features, full, "--max-steps", "2"), check=True, capture_output=True,
                   timeout=600)  # fmt: skip
    saved = json.loads((full / "trainer_state.json").read_text())
    del saved["loop"]["data_fraction"]  # as written before the field existed
    del saved["recipe_config"]["noise_std"]  # as written before the knob existed
    (full / "trainer_state.json").write_text(json.dumps(saved))
    again = subprocess.run(_train_cmd(target_path, tiny_features, full, "--max-steps", "3", "--resume"),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode != 0 and "different loop" in again.stderr  # max_steps differs: still refused
    again = subprocess.run(_train_cmd(target_path, tiny_features, full, "--max-steps", "2", "--resume"),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    again = subprocess.run(_train_cmd(target_path, tiny_features, full, "--max-steps", "2", "--resume",
                                      "--noise-std", "0.5"), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode != 0 and "different recipe_config" in again.stderr


_FRAGMENT = """
import torch
from vllm_coral.training.loop import release_freed_memory

def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

kept = [torch.ones(25_000) for _ in range(2_000)]  # 100 KB each: below glibc's mmap threshold, so on the heap
del kept[::2]  # free every other one: ~100 MB of holes the heap's top cannot give back
before = anon_mb()
print(release_freed_memory(), before - anon_mb())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssAnon from /proc (Linux)")
def test_release_freed_memory_gives_heap_holes_back():
    """The loop's CPU memory guard: freed heap pages between live tensors go back to the OS."""
    out = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "False":
        pytest.skip("no glibc malloc_trim in this C library")
    assert float(out[1]) > 50, f"only {float(out[1]):.1f} MB of ~100 MB freed heap went back to the OS"


@pytest.mark.parametrize("preset, want", [(None, "64"), ("7", "7")])
def test_training_caps_onednn_primitive_cache_unless_the_user_did(preset, want):
    """oneDNN keeps a primitive per matmul shape (1,024 by default) and every batch brings new shapes."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = "import os, vllm_coral.training; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert got.strip() == want

"""FSPAD drafter: both operators against hand-worked cases, the [predict | regress] layout,
the ablation switches (both off == EagleDrafter), its weight map and config round trip,
one-line refusals of bad checkpoints, and that HASS-style unrolling computes exactly what
drafting step j computes at inference. In vLLM: tests/vllm/test_fspad_vllm.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.eagle import EagleConfig, EagleDrafter, eagle_tensor_specs
from vllm_coral.models.fspad import FeatureSampler, FspadConfig, FspadDrafter
from vllm_coral.models.registry import families, load_drafter, read_drafter, save_drafter, validate_drafter
from vllm_coral.training.unrolled import unrolled_steps

from .test_eagle import TINY_TARGET

SWITCHES = [(True, True), (True, False), (False, True), (False, False)]


def _silu(z: float) -> float:
    return z / (1.0 + math.exp(-z))


def _drafter(fs: bool = True, pad: bool = True, seed: int = 0) -> FspadDrafter:
    torch.manual_seed(seed)
    model = FspadDrafter(FspadConfig.from_target(TINY_TARGET, feature_sampling=fs, pad=pad))
    with torch.no_grad():  # norms start at 1 and fc.bias near 0; perturb so the tests see them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name == "fc.bias":
                p.uniform_(-0.5, 0.5)
    return model


def _tiny_hand_drafter(pad: bool) -> FspadDrafter:
    """H=4, I=6, one head of width 4, no RMSNorm epsilon; every weight zero (set by the tests)."""
    layer = EagleConfig(hidden_size=4, intermediate_size=6, num_attention_heads=1, num_key_value_heads=1,
                        head_dim=4, vocab_size=10, rms_norm_eps=0.0)  # fmt: skip
    model = FspadDrafter(FspadConfig(layer, feature_sampling=True, pad=pad))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def test_feature_sampling_hand_worked():
    """fc picks f and adds the bias: h = f + b = [1, -1, 1, -1] (rms 1, so norm(h) = w * h).
    norm weight w = [1, 2, 1, 0.5] -> n = [1, -2, 1, -0.5]; e = [2, 0, 0, 0].
    gate = W_g e = [0, 2, -2, 1, 0, 0]; up = W_u n = [n0, n1, n2, n3, n0 + n2, 0] = [1, -2, 1, -0.5, 2, 0].
    silu(gate) * up = [0, -2 silu(2), silu(-2), -0.5 silu(1), 0, 0]; down sums entries 3..5 into
    channel 3 and copies 1, 2 -> x = h + [0, -2 silu(2), silu(-2), -0.5 silu(1)]."""
    model = _tiny_hand_drafter(pad=True)
    s = model.sampler
    with torch.no_grad():
        model.fc.weight[:, 4:] = torch.eye(4)  # fc(concat(e, f)) = f + bias
        model.fc.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0]))
        s.norm.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 0.5]))
        s.gate_proj.weight[:, 0] = torch.tensor([0.0, 1.0, -1.0, 0.5, 0.0, 0.0])
        s.up_proj.weight[:4] = torch.eye(4)
        s.up_proj.weight[4, 0] = s.up_proj.weight[4, 2] = 1.0
        s.down_proj.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                               [0, 0, 0, 1, 1, 1]]))  # fmt: skip
    e = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]])
    f = torch.tensor([[[0.5, -1.0, 1.0, -1.0]]])
    want = torch.tensor([1.0, -1.0 - 2 * _silu(2.0), 1.0 + _silu(-2.0), -1.0 - 0.5 * _silu(1.0)])
    torch.testing.assert_close(model.layer_input(e, f)[0, 0], want)


def test_pad_layer_hand_worked_predict_and_regress_channels():
    """Attention silenced (o_proj = 0) so r = x = [1, -1, 1, -1] and norm(r) = r.
    gate = [x0, x2, 0, ...] = [1, 1, 0, ...], up = [x0, x1, 0, ...] = [1, -1, 0, ...],
    m = silu(gate) * up = [silu(1), -silu(1), 0, 0, 0, 0]. down_proj [2H=8, I=6] writes m0 to
    output channel 0 (predict half) and 2 m1 to channel 5 (regress half, its channel 1):
    predict = r + [silu(1), 0, 0, 0], regress = r + [0, -2 silu(1), 0, 0]."""
    model = _tiny_hand_drafter(pad=True)
    mlp = model.layers[0].mlp
    assert mlp.down_proj.weight.shape == (8, 6)
    with torch.no_grad():
        model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        mlp.gate_proj.weight[0, 0] = mlp.gate_proj.weight[1, 2] = 1.0
        mlp.up_proj.weight[0, 0] = mlp.up_proj.weight[1, 1] = 1.0
        mlp.down_proj.weight[0, 0] = 1.0
        mlp.down_proj.weight[5, 1] = 2.0
    x = torch.tensor([[[1.0, -1.0, 1.0, -1.0]]])
    predict, regress = model.run_layer(x, torch.arange(1))
    torch.testing.assert_close(predict[0, 0], torch.tensor([1.0 + _silu(1.0), -1.0, 1.0, -1.0]))
    torch.testing.assert_close(regress[0, 0], torch.tensor([1.0, -1.0 - 2 * _silu(1.0), 1.0, -1.0]))


def test_without_pad_predict_is_regress():
    model = _drafter(pad=False)
    predict, regress = model(torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.arange(5))
    assert predict is regress and predict.shape == (1, 5, 64)


def test_both_switches_off_is_eagle_exactly():
    """Same names, shapes and weights as EagleDrafter, and bit-identical outputs."""
    fspad = _drafter(fs=False, pad=False)
    assert fspad.config.tensor_specs() == eagle_tensor_specs(fspad.config.layer)
    eagle = EagleDrafter(fspad.config.layer)
    eagle.load_state_dict(fspad.state_dict())
    emb, feat, pos = torch.randn(2, 7, 64), torch.randn(2, 7, 64), torch.arange(7)
    predict, regress = fspad(emb, feat, pos)
    assert torch.equal(predict, eagle(emb, feat, pos)) and regress is predict


@pytest.mark.parametrize("fs, pad", SWITCHES)
def test_weight_map_is_the_models_state(fs, pad):
    model = _drafter(fs, pad)
    specs = model.config.tensor_specs()
    assert {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()} == specs
    assert ("fc.bias" in specs) == fs and ("sampler.gate_proj.weight" in specs) == fs
    assert specs["layers.0.mlp.down_proj.weight"][0] == ((128 if pad else 64), 96)
    assert not any(k.startswith(("embed_tokens", "lm_head")) for k in specs)  # vLLM shares the target's


def test_extra_parameters_at_smollm2_shape():
    """H=576, I=1536: FS adds 3*H*I + H (sampler norm) + H (fc bias) = 2,654,208 + 1,152 =
    2,655,360; PAD adds H*I = 884,736 (down_proj I -> 2H); together 3,540,096."""
    smol = {**TINY_TARGET, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
            "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}  # fmt: skip

    def count(fs: bool, pad: bool) -> int:
        specs = FspadConfig.from_target(smol, feature_sampling=fs, pad=pad).tensor_specs()
        return sum(math.prod(shape) for shape, _ in specs.values())

    base = count(False, False)
    assert (count(True, False) - base, count(False, True) - base, count(True, True) - base) == (
        2_655_360, 884_736, 3_540_096)  # fmt: skip


def test_round_trip_and_the_fields_vllm_reads(tmp_path):
    model = _drafter()
    path = save_drafter(model, tmp_path / "d", family="fspad", recipe="fspad")
    hf = json.loads((path / "config.json").read_text())
    assert hf["architectures"] == ["EagleFspadLlamaForCausalLM"] and hf["num_hidden_layers"] == 1
    assert hf["fspad_feature_sampling"] is True and hf["fspad_pad"] is True and hf["vllm_coral"]["config"] == {}
    loaded, ckpt = load_drafter(path, TINY_TARGET)
    assert ckpt.config == model.config and ckpt.speculative_config(3)["method"] == "eagle"
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    fam = families()["fspad"]
    assert fam.serve.vllm_class == "vllm_coral.plugin.fspad:EagleFspadLlamaForCausalLM"
    assert set(fam.recipes) == {"fspad", "fspad-hass"}
    off = save_drafter(_drafter(False, False), tmp_path / "off", family="fspad", recipe="fspad")
    assert read_drafter(off).config == FspadConfig.from_target(TINY_TARGET, feature_sampling=False, pad=False)


def _edit(path, *, config=None, tensors=None):
    if config is not None:
        hf = json.loads((path / "config.json").read_text())
        config(hf)
        (path / "config.json").write_text(json.dumps(hf))
    if tensors is not None:
        t = load_file(str(path / "model.safetensors"))
        tensors(t)
        save_file(t, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "target, config, tensors, message",
    [
        ({"hidden_size": 80}, None, None, "drafter hidden_size=64 does not match the target's hidden_size=80"),
        ({"vocab_size": 301}, None, None, "drafter vocab_size=300 does not match the target's vocab_size=301"),
        (None, lambda hf: hf.update(intermediate_size=80), None, "has shape [96, 64], expected [80, 64]"),
        (None, None, lambda t: t.pop("sampler.up_proj.weight"), "missing tensor(s) sampler.up_proj.weight"),
        (None, None, lambda t: t.update({"layers.0.mlp.down_proj.weight": torch.zeros(64, 96)}),
         "tensor layers.0.mlp.down_proj.weight has shape [64, 96], expected [128, 96]"),
        (None, lambda hf: hf.update(fspad_feature_sampling=False), None, "unexpected tensor(s) fc.bias"),
        (None, lambda hf: hf.pop("fspad_pad"), None, "lacks true/false fspad_pad"),
        (None, lambda hf: hf["vllm_coral"]["config"].update(pad=True), None, "unknown FSPAD field(s) pad"),
    ],
)  # fmt: skip
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, target, config, tensors, message):
    path = save_drafter(_drafter(), tmp_path / "d", family="fspad", recipe="fspad")
    _edit(path, config=config, tensors=tensors)
    with pytest.raises(CheckpointError) as exc:
        validate_drafter(path, {**TINY_TARGET, **(target or {})})
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("fs, pad", [(True, True), (False, True), (True, False)])
def test_unrolled_step_j_equals_inference_drafting_step_j(fs, pad):
    """Step j at index t == the drafter run as vLLM drafts: indices <= t-j+1 verified (fed
    the target's features f) and the next j-1 each fed the previous index's regress."""
    model = _drafter(fs, pad).eval()
    S, unroll = 7, 3
    emb, f = torch.randn(1, S, 64), torch.randn(1, S, 64)
    with torch.no_grad():
        steps = {j: (p, r) for j, p, r in unrolled_steps(model, emb, f, torch.arange(S), unroll)}
        for j in range(1, unroll + 1):
            for t in range(j - 1, S):
                verified = t - j + 1
                feats = f[:, : verified + 1]
                for n in range(verified + 1, t + 1):  # draft positions, one forward each
                    _, regress = model(emb[:, :n], feats, torch.arange(n))
                    feats = torch.cat([feats, regress[:, -1:]], dim=1)
                predict, regress = model(emb[:, : t + 1], feats, torch.arange(t + 1))
                torch.testing.assert_close(steps[j][0][:, t], predict[:, t], atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(steps[j][1][:, t], regress[:, t], atol=2e-5, rtol=1e-5)

"""Drafter-family registry: checkpoints written and read by one function, validated from
config.json and the safetensors header only, with one-line errors for every kind of bad
checkpoint, and schema-1 checkpoints converted once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.eagle import EagleConfig, EagleDrafter
from vllm_coral.models.registry import families, load_drafter, read_drafter, save_drafter, validate_drafter
from vllm_coral.models.upgrade import upgrade_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY_TARGET = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}  # fmt: skip


def _saved(tmp_path, recipe="hass") -> Path:
    torch.manual_seed(0)
    model = EagleDrafter(EagleConfig.from_target(TINY_TARGET))
    return save_drafter(model, tmp_path / "ckpt", family="eagle", recipe=recipe, training={"step": 3})


def _edit_config(path: Path, edit) -> None:
    hf = json.loads((path / "config.json").read_text())
    edit(hf)
    (path / "config.json").write_text(json.dumps(hf))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_builtin_families_declare_how_vllm_serves_them():
    fams = families()
    assert fams["eagle"].serve.method == "eagle" and fams["eagle"].serve.vllm_class is None
    assert set(fams["eagle"].recipes) == {"eagle", "hass", "coral"}
    coral = fams["coral"].serve
    assert coral.architecture == "EagleCoralLlamaForCausalLM" and coral.vllm_class.endswith(":EagleCoralLlamaForCausalLM")
    assert coral.speculative_config == {"use_local_argmax_reduction": True}


def test_round_trip_is_exact_and_metadata_is_uniform(tmp_path):
    path = _saved(tmp_path)
    hf = json.loads((path / "config.json").read_text())
    assert hf["architectures"] == ["EagleLlamaForCausalLM"] and hf["num_hidden_layers"] == 1
    assert hf["vllm_coral"] == {"schema": 2, "family": "eagle", "recipe": "hass", "config": {}, "training": {"step": 3}}
    model, ckpt = load_drafter(path, TINY_TARGET)
    assert ckpt.recipe == "hass" and ckpt.config == EagleConfig.from_target(TINY_TARGET)
    assert ckpt.speculative_config(4) == {"method": "eagle", "model": str(path), "num_speculative_tokens": 4}
    torch.manual_seed(0)
    want = EagleDrafter(EagleConfig.from_target(TINY_TARGET))
    for name, tensor in want.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_the_fields_vllm_reads_are_the_fields_checked(tmp_path):
    """An edited top-level hidden_size (what vLLM reads) is caught: there is no second copy."""
    path = _saved(tmp_path)
    _edit_config(path, lambda hf: hf.update(hidden_size=80, head_dim=20))
    with pytest.raises(CheckpointError, match="hidden_size=80 does not match the target's hidden_size=64"):
        validate_drafter(path, TINY_TARGET)
    with pytest.raises(CheckpointError, match=r"fc.weight has shape \[64, 128\], expected \[80, 160\]"):
        validate_drafter(path)


def test_validation_reads_headers_only(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    import safetensors

    def no_tensor_reads(*a, **k):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(safetensors.safe_open, "get_tensor", no_tensor_reads, raising=False)
    validate_drafter(path, TINY_TARGET)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop("fc.weight"), "missing tensor(s) fc.weight"),
        (lambda t: t.update(extra=torch.zeros(1)), "unexpected tensor(s) extra"),
        (lambda t: t.update({"fc.weight": torch.zeros(64, 64)}), "fc.weight has shape [64, 64], expected [64, 128]"),
        (lambda t: t.update({"fc.weight": torch.zeros(64, 128, dtype=torch.bfloat16)}), "fc.weight is BF16, expected F32"),
    ],
)
def test_bad_tensors_are_refused_in_one_line(tmp_path, edit, message):
    path = _saved(tmp_path)
    _edit_tensors(path, edit)
    with pytest.raises(CheckpointError) as exc:
        validate_drafter(path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda hf: hf["vllm_coral"].update(family="medusa"), "unknown drafter family 'medusa'"),
        (lambda hf: hf.pop("vllm_coral"), "not a vllm-coral drafter"),
        (lambda hf: hf.update(num_hidden_layers=2), "exactly 1"),
        (lambda hf: hf.pop("vocab_size"), "lacks vocab_size"),
        (lambda hf: hf["vllm_coral"]["config"].update(bogus=1), "unknown EAGLE field"),
        (lambda hf: hf.update(architectures=["LlamaForCausalLM"]), "do not match family 'eagle'"),
    ],
)
def test_bad_configs_are_refused_in_one_line(tmp_path, edit, message):
    path = _saved(tmp_path)
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=message) as exc:
        read_drafter(path)
    assert "\n" not in str(exc.value)


def test_truncated_weights_and_missing_files_are_refused(tmp_path):
    path = _saved(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        validate_drafter(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_drafter(tmp_path / "nothing")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_drafter(tmp_path / "nothing")


def test_absolute_paths_never_reach_a_checkpoint(tmp_path):
    model = EagleDrafter(EagleConfig.from_target(TINY_TARGET))
    with pytest.raises(ValueError, match="absolute path"):
        save_drafter(model, tmp_path / "c", family="eagle", recipe="eagle", training={"features": str(tmp_path)})


def test_schema_1_is_refused_then_upgraded_once(tmp_path):
    """A schema-1 EAGLE config (recipe under 'method', a config copy, an absolute path)."""
    path = _saved(tmp_path)
    config = EagleConfig.from_target(TINY_TARGET)
    copy = {name: getattr(config, name) for name in config.__dataclass_fields__}
    _edit_config(path, lambda hf: hf.update(vllm_coral={"family": "eagle", "method": "hass", "config": copy,
                                                        "features": "/abs/features/train", "step": 7}))  # fmt: skip
    with pytest.raises(CheckpointError, match="schema 1.*vllm-coral drafter upgrade"):
        read_drafter(path)
    assert "schema 1 -> 2" in upgrade_checkpoint(path)
    ckpt = read_drafter(path)
    assert ckpt.recipe == "hass" and ckpt.training == {"step": 7, "features": "train"}
    assert upgrade_checkpoint(path) == "already schema 2"


def test_committed_checkpoints_are_schema_2_and_portable(target_path):
    target_config = json.loads((target_path / "config.json").read_text())
    folder = ROOT / "checkpoints" / "smollm2-135m"
    for path in sorted(folder.iterdir()):
        ckpt = validate_drafter(path, target_config)
        text = (path / "config.json").read_text()
        assert "/work" not in text and "/home" not in text and "/root" not in text, path
        assert ckpt.recipe in ckpt.family.recipes or ckpt.recipe in {"coral-router"}


def test_schema_1_coral_upgrade_keeps_the_router_fields(tmp_path):
    path = tmp_path / "coral"
    shutil.copytree(ROOT / "checkpoints" / "smollm2-135m" / "coral", path)
    eagle = read_drafter(path).config.eagle
    copy = {name: getattr(eagle, name) for name in eagle.__dataclass_fields__}
    old = {"family": "coral", "config": copy, "drafter": "/abs/exp/coral/drafter",
           "coral": {"eagle": copy, "num_groups": 16, "top_k": 2, "partition": "frequency"}}  # fmt: skip
    _edit_config(path, lambda hf: hf.update(vllm_coral=old))
    upgrade_checkpoint(path)
    ckpt = validate_drafter(path)
    assert (ckpt.family.name, ckpt.recipe, ckpt.config.num_groups, ckpt.config.top_k) == ("coral", "coral-router", 16, 2)
    assert ckpt.training == {"drafter": "drafter"}


def test_config_as_transformers_hands_it_to_vllm_parses_the_same():
    """vLLM passes the draft config through transformers 5, which renames torch_dtype to
    dtype and moves rope_theta into rope_parameters; the plugin parses that dict."""
    from transformers import AutoConfig

    from vllm_coral.models.registry import parse_drafter_config

    for name in ("eagle", "hass", "coral"):
        path = ROOT / "checkpoints" / "smollm2-135m" / name
        as_vllm_sees_it = AutoConfig.from_pretrained(path).to_dict()
        assert as_vllm_sees_it.get("rope_theta") is None  # the renaming this test is about
        assert parse_drafter_config(as_vllm_sees_it, name)[2] == read_drafter(path).config


def test_portable_text_strips_machine_paths(monkeypatch, tmp_path):
    from vllm_coral.models.checkpoint import portable_text

    monkeypatch.chdir(tmp_path)
    text = (f'bench --questions mt=/elsewhere/data/q/mt.jsonl --out {tmp_path}/results/x '
            '--method {"checkpoint": "/srv/runs/kd/drafter"} keep/relative')  # fmt: skip
    assert portable_text(text) == ('bench --questions mt=q/mt.jsonl --out results/x '
                                   '--method {"checkpoint": "kd/drafter"} keep/relative')  # fmt: skip

"""The embedded target: locate, verify, convert once, and refuse bad files in one line."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from vllm_coral.models import targets
from vllm_coral.models.targets import TargetModelError, fetch_target

SMOL = targets.TARGETS["smollm2-135m"]


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package folder holding a small stand-in GGUF file."""
    pkg = tmp_path / "site" / "vllm_coral_fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    data = b"GGUF" + bytes(range(256)) * 16
    (pkg / "model.gguf").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = replace(
        SMOL,
        name="fake",
        pypi_package="vllm-coral-fake-gguf-pkg",
        module="vllm_coral_fake_gguf_pkg",
        gguf_file="model.gguf",
        sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setitem(targets.TARGETS, "fake", spec)
    return pkg, spec


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_locate_finds_gguf_without_importing_the_package(fake_package):
    pkg, spec = fake_package
    assert targets.locate_gguf(spec) == pkg / "model.gguf"
    assert spec.module not in sys.modules


def test_corrupted_gguf_is_refused(fake_package, tmp_path):
    pkg, spec = fake_package
    with (pkg / "model.gguf").open("r+b") as f:
        f.seek(10)
        f.write(b"\xff")
    with pytest.raises(TargetModelError) as exc:
        fetch_target("fake", home=tmp_path / "home", progress=False)
    msg = _one_line(exc)
    assert "sha256" in msg and "model.gguf" in msg and "--force-reinstall" in msg
    assert not (tmp_path / "home" / "models" / "fake").exists()


def test_missing_gguf_is_refused(fake_package, tmp_path):
    pkg, _ = fake_package
    (pkg / "model.gguf").unlink()
    with pytest.raises(TargetModelError) as exc:
        fetch_target("fake", home=tmp_path / "home", progress=False)
    assert "model.gguf is missing" in _one_line(exc)


def test_missing_package_is_refused_without_install(monkeypatch, tmp_path):
    spec = replace(SMOL, name="absent", module="vllm_coral_no_such_package_xyz")
    monkeypatch.setitem(targets.TARGETS, "absent", spec)
    with pytest.raises(TargetModelError) as exc:
        fetch_target("absent", home=tmp_path, progress=False)
    assert "is not installed" in _one_line(exc)
    # with an installer, it is asked for exactly the pinned requirement (and the package
    # still missing afterwards is the same one-line error)
    asked = []
    with pytest.raises(TargetModelError, match="is not installed"):
        fetch_target("absent", home=tmp_path, installer=asked.append, progress=False)
    assert asked == [f"{SMOL.pypi_package}=={SMOL.pypi_version}"]


def test_unknown_target_is_refused():
    with pytest.raises(TargetModelError) as exc:
        fetch_target("no-such-model")
    assert "smollm2-135m" in _one_line(exc)


def test_cli_reports_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_coral.cli", "models", "fetch", "no-such-model"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("vllm-coral: error: unknown target model")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_incomplete_conversion_is_not_reused(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x" * 10)
    prov = {"source_sha256": SMOL.sha256, "conversion": 1, "files": {"model.safetensors": 11}}
    (out / "vllm_coral_target.json").write_text(json.dumps(prov))
    assert not targets._is_complete(SMOL, out)  # truncated file
    prov["files"]["model.safetensors"] = 10
    (out / "vllm_coral_target.json").write_text(json.dumps(prov))
    assert targets._is_complete(SMOL, out)


def test_real_target_converted_once(target_path, monkeypatch):
    config = json.loads((target_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["vocab_size"]) == (576, 49152)
    assert "quantization_config" not in config
    assert (target_path / "chat_template.jinja").is_file()
    weights = target_path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    # A second call must neither hash the GGUF nor convert again.
    def boom(*a, **k):
        raise AssertionError("second fetch did work")

    monkeypatch.setattr(targets, "sha256_file", boom)
    monkeypatch.setattr(targets, "_convert", boom)
    assert fetch_target("smollm2-135m", progress=False) == target_path
    assert weights.stat().st_mtime_ns == mtime


def test_real_target_answers_a_chat_prompt_in_transformers(target_path):
    """The converted checkpoint is the real instruct model: it answers 2+2 with 4."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target_path)
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "4" in answer, answer

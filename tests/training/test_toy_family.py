"""A new drafter family needs its own files and one registry entry, nothing else: this file
declares a toy feature-level family (a config, a model, a recipe) and, without any edit
elsewhere in the package, trains it through the one training loop, saves it, validates it
against the real target from config.json and the safetensors header, resolves it as a
benchmark method row (served as vLLM's eagle method), builds its CLI flags from its config,
and has a mismatching checkpoint refused with one line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from torch import nn

from vllm_coral.models.checkpoint import CheckpointError
from vllm_coral.models.registry import DrafterFamily, ServeSpec, families, register_family, save_drafter, validate_drafter
from vllm_coral.training.loop import LoopConfig, run
from vllm_coral.training.recipes import Recipe, get_recipe
from vllm_coral.training.unrolled import next_token_weight
from vllm_coral.workflows.bench.methods import resolve_methods


@dataclass(frozen=True)
class ToyConfig:
    TARGET_FIELDS: ClassVar[tuple[str, ...]] = ("hidden_size", "vocab_size")
    hidden_size: int
    vocab_size: int
    # The toy's own knob, stored under vllm_coral.config (vLLM does not read it).
    mix: float = 0.5
    torch_dtype: str = "float32"

    def to_checkpoint(self) -> tuple[dict, dict]:
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "torch_dtype": self.torch_dtype,
                "model_type": "llama", "num_hidden_layers": 1}, {"mix": self.mix}  # fmt: skip

    @classmethod
    def from_checkpoint(cls, hf: Mapping, fields: Mapping) -> ToyConfig:
        return cls(hidden_size=hf["hidden_size"], vocab_size=hf["vocab_size"], torch_dtype=hf["torch_dtype"], **fields)

    @classmethod
    def from_target(cls, target_config: Mapping, **overrides) -> ToyConfig:
        return cls(hidden_size=target_config["hidden_size"], vocab_size=target_config["vocab_size"], **overrides)

    def tensor_specs(self) -> dict:
        H = self.hidden_size
        return {"fc.weight": ((H, 2 * H), torch.float32)}


class ToyDrafter(nn.Module):
    """h_{t+1} = fc(concat(E[x_{t+1}], f_t)): a one-matrix feature drafter."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, emb, feats):
        return self.fc(torch.cat((emb, feats), dim=-1))

    def checkpoint_tensors(self) -> dict:
        return dict(self.state_dict())

    def load_checkpoint_tensors(self, tensors) -> None:
        self.load_state_dict(dict(tensors))


@dataclass(frozen=True)
class ToyRecipeConfig:
    feature_weight: float = field(default=1.0, metadata={"help": "weight of the feature MSE"})


def _build(cfg, head, data):
    return ToyDrafter(ToyConfig.from_target(head.config))


def _loss(cfg, model, head, batch):
    h = model(head.embed_ids(batch.ids[:, 1:]), batch.feats[:, :-1])
    keep = next_token_weight(batch.mask) > 0
    loss = cfg.feature_weight * ((h - batch.feats[:, 1:]) ** 2)[keep].mean()
    return loss, {"loss/feature": loss.item()}


def _export(cfg, model, head, out, training):
    return [save_drafter(model, out / "drafter", family="toy", recipe="toy-mse", training={"step": training["step"]})]


TOY_RECIPE = Recipe(name="toy-mse", family="toy", preset=ToyRecipeConfig(), build=_build, loss=_loss, export=_export,
                    help="toy feature drafter, MSE on the next feature")  # fmt: skip
TOY = DrafterFamily(name="toy", config_cls=ToyConfig, model_cls=ToyDrafter,
                    serve=ServeSpec(method="eagle", architecture="EagleToyForCausalLM"),
                    recipes={"toy-mse": TOY_RECIPE})  # fmt: skip


@pytest.fixture()
def toy_family():
    register_family(TOY, replace=True)
    yield TOY
    from vllm_coral.models import registry

    registry._FAMILIES.pop("toy", None)


def test_toy_family_trains_saves_validates_and_resolves(toy_family, target_path, tiny_features, tmp_path):
    assert "toy" in families() and get_recipe("toy-mse") is TOY_RECIPE
    loop = LoopConfig(max_steps=3, batch_tokens=256, save_every=3, warmup_steps=1, lr=1e-3)
    summary = run(TOY_RECIPE, TOY_RECIPE.preset, loop, target_path, tiny_features, tmp_path / "run", progress=False)
    assert summary["steps"] == 3 and summary["checkpoints"] == [str(tmp_path / "run" / "drafter")]
    ckpt_dir = tmp_path / "run" / "drafter"
    target_config = json.loads((target_path / "config.json").read_text())
    ckpt = validate_drafter(ckpt_dir, target_config)
    assert (ckpt.family.name, ckpt.recipe, ckpt.config.mix) == ("toy", "toy-mse", 0.5)

    entries = [{"name": "toy by recipe", "method": "toy-mse", "checkpoint": str(ckpt_dir)},
               {"name": "toy by family", "method": "toy", "checkpoint": str(ckpt_dir)}]  # fmt: skip
    specs = {s.name: s for s in resolve_methods(entries, target_config=target_config, default_k=2)}
    for name in ("toy by recipe", "toy by family"):
        assert specs[name].error is None, specs[name].error
        assert specs[name].speculative_config == {"method": "eagle", "model": str(ckpt_dir), "num_speculative_tokens": 2}

    # a checkpoint for another target: refused with one line, as a row error and directly
    hf = json.loads((ckpt_dir / "config.json").read_text())
    hf["vocab_size"] = 1000
    (ckpt_dir / "config.json").write_text(json.dumps(hf))
    bad = resolve_methods([entries[0]], target_config=target_config)[1]
    assert "vocab_size=1000 does not match the target's vocab_size=49152" in bad.error and "\n" not in bad.error
    with pytest.raises(CheckpointError, match="vocab_size=1000"):
        validate_drafter(ckpt_dir, target_config)


def test_toy_recipe_gets_generated_cli_flags(toy_family, target_path, tiny_features, tmp_path, capsys):
    from vllm_coral.cli import main

    out = tmp_path / "cli"
    code = main(["train", "toy-mse", "--target", str(target_path), "--features", str(tiny_features), "--out", str(out),
                 "--feature-weight", "2.0", "--max-steps", "2", "--batch-tokens", "256", "--device", "cpu"])  # fmt: skip
    assert code == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["recipe"] == "toy-mse" and state["recipe_config"] == {"feature_weight": 2.0}
    assert state["loop"]["max_steps"] == 2 and state["loop"]["device"] == "cpu"
    assert f"drafter: {out / 'drafter'}" in capsys.readouterr().out

"""CLI flags generated from config dataclasses: one field is one flag, presets hold unless a
flag overrides them, optional sections switch on and off."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from vllm_coral.cli.flags import add_config_flags, config_from_args
from vllm_coral.training.unrolled import CORAL, CSRA, EAGLE, HASS, TopKDistill


def _parse(recipe_preset, argv):
    p = argparse.ArgumentParser()
    add_config_flags(p, type(recipe_preset), recipe_preset, dest="r")
    return config_from_args(p.parse_args(argv), recipe_preset, dest="r")


def test_no_flags_keep_the_preset():
    for preset in (EAGLE.preset, HASS.preset, CORAL.preset):
        assert _parse(preset, []) == preset


def test_flags_override_fields_and_nested_sections():
    cfg = _parse(CORAL.preset, ["--unroll", "4", "--csra-weight", "0.3", "--topk-k", "5"])
    assert cfg.unroll == 4 and cfg.csra == CSRA(weight=0.3, temperature=0.1) and cfg.topk == TopKDistill(1.0, 5)


def test_optional_sections_switch_on_and_off():
    assert _parse(CORAL.preset, ["--no-csra"]) == HASS.preset
    assert _parse(HASS.preset, ["--csra"]).csra == CSRA()
    assert _parse(HASS.preset, ["--csra-temperature", "0.05"]).csra == CSRA(weight=0.1, temperature=0.05)
    assert _parse(EAGLE.preset, ["--topk", "--unroll", "3"]) == HASS.preset


def test_a_new_field_is_a_new_flag():
    @dataclass(frozen=True)
    class Knobs:
        alpha: float = field(default=1.0, metadata={"help": "the alpha knob"})
        sizes: tuple[int, ...] = (1, 2)
        limit: int | None = None

    p = argparse.ArgumentParser()
    add_config_flags(p, Knobs, Knobs(), dest="k")
    assert "the alpha knob" in p.format_help()
    cfg = config_from_args(p.parse_args(["--alpha", "2", "--sizes", "3", "4", "--limit", "none"]), Knobs(), dest="k")
    assert cfg == Knobs(alpha=2.0, sizes=(3, 4), limit=None)
    assert config_from_args(p.parse_args(["--limit", "7"]), Knobs(), dest="k").limit == 7
    with pytest.raises(SystemExit):
        p.parse_args(["--alpha", "not-a-number"])


def test_invalid_values_fail_in_the_config():
    with pytest.raises(ValueError, match="needs unroll >= 2"):
        _parse(EAGLE.preset, ["--csra"])

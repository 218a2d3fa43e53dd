"""Method rows: validated before any engine starts; a bad row is an error row, not a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_coral.models.checkpoint import read_config
from vllm_coral.workflows.bench.methods import MethodSpec, load_methods_file, parse_method, resolve_methods
from vllm_coral.workflows.bench.offline import engine_plan

CKPTS = Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m"


@pytest.fixture(scope="module")
def target_config(target_path):
    return read_config(target_path)


def _by_name(specs):
    return {s.name: s for s in specs}


def test_committed_drafters_and_builtins_resolve(target_config):
    entries = [
        {"name": "ngram", "method": "ngram", "prompt_lookup_max": 5},
        {"name": "EAGLE", "method": "eagle", "checkpoint": str(CKPTS / "eagle")},
        {"name": "HASS", "method": "hass", "checkpoint": str(CKPTS / "hass"), "num_speculative_tokens": 2},
        {"name": "CORAL", "method": "coral", "checkpoint": str(CKPTS / "coral")},
    ]
    specs = resolve_methods(entries, target_config=target_config, default_k=3)
    assert [s.name for s in specs] == ["target", "ngram", "EAGLE", "HASS", "CORAL"]  # target added first
    assert all(s.error is None for s in specs)
    s = _by_name(specs)
    assert s["target"].speculative_config is None
    assert s["ngram"].speculative_config == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                                             "prompt_lookup_max": 5}  # fmt: skip
    assert s["HASS"].speculative_config["num_speculative_tokens"] == 2
    assert s["CORAL"].speculative_config["use_local_argmax_reduction"] is True
    # The draft sampling mode goes only to drafters that have token probabilities.
    assert s["EAGLE"].engine_config("probabilistic")["draft_sample_method"] == "probabilistic"
    assert "draft_sample_method" not in s["ngram"].engine_config("probabilistic")
    assert s["target"].engine_config("greedy") is None


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "x", "method": "medusa"}, "unknown method 'medusa'"),
        ({"name": "x", "method": "eagle", "checkpoint": "/no/such/dir"}, "checkpoint /no/such/dir: no config.json"),
        ({"name": "x", "method": "eagle"}, 'eagle needs "checkpoint"'),
        ({"name": "x", "method": "eagle", "checkpoint": str(CKPTS / "hass")}, "holds a hass drafter (eagle family), not eagle"),
        ({"name": "x", "method": "hass", "checkpoint": str(CKPTS / "coral")}, "holds a coral-router drafter (coral family), not hass"),
        ({"name": "x", "method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be a positive"),
        ({"name": "x", "method": "ngram", "prompt_lookup": 3}, "unknown field(s) prompt_lookup"),
        ({"name": "x", "method": "ngram", "speculative_config": [1]}, '"speculative_config" must be a JSON object'),
        ({"name": "x", "method": "draft_model"}, 'draft_model needs "model"'),
    ],
)
def test_bad_entry_becomes_an_error_row(target_config, entry, message):
    specs = resolve_methods([entry, {"name": "ok", "method": "ngram"}], target_config=target_config)
    bad, ok = _by_name(specs)["x"], _by_name(specs)["ok"]
    assert bad.error is not None and message in bad.error and "\n" not in bad.error
    assert ok.error is None  # the other rows still run


def test_checkpoint_for_another_target_is_refused(target_config):
    other = dict(target_config, hidden_size=target_config["hidden_size"] * 2)
    [_, spec] = resolve_methods([{"name": "x", "method": "eagle", "checkpoint": str(CKPTS / "eagle")}],
                                target_config=other)  # fmt: skip
    assert spec.error and "hidden" in spec.error


def test_duplicate_names_and_bad_method_arguments(target_config):
    entries = [{"name": "a", "method": "ngram"}, {"name": "a", "method": "ngram"}, parse_method("{nope"),
               parse_method("[1, 2]")]  # fmt: skip
    specs = resolve_methods(entries, target_config=target_config)
    errors = [s.error for s in specs if s.error]
    assert len(errors) == 3
    assert "duplicate method name 'a'" in errors[0]
    assert "invalid JSON" in errors[1] and "expected a JSON object" in errors[2]


def test_explicit_target_row_moves_first(target_config):
    specs = resolve_methods([{"name": "ngram", "method": "ngram"}, {"name": "baseline", "method": "none"}],
                            target_config=target_config)  # fmt: skip
    assert [s.name for s in specs] == ["baseline", "ngram"]


def test_methods_file_paths_are_relative_to_the_file(tmp_path, target_config):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "m.json"
    rel = "../" * len((tmp_path / "cfg").parts[1:]) + str(CKPTS / "eagle").lstrip("/")
    path.write_text(json.dumps({"num_speculative_tokens": 2, "methods": [{"name": "E", "method": "eagle", "checkpoint": rel}]}))
    entries, k, base = load_methods_file(path)
    [_, spec] = resolve_methods(entries, target_config=target_config, default_k=k, base_dir=base)
    assert spec.error is None and spec.speculative_config["model"] == str(CKPTS / "eagle")
    assert spec.speculative_config["num_speculative_tokens"] == 2


def test_unreadable_methods_file_is_one_line(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('{"methods": [\n  {"name": "x",}\n]}')
    with pytest.raises(ValueError, match=r"invalid JSON at line 2 column 16"):
        load_methods_file(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_methods_file(tmp_path / "missing.json")
    bad.write_text('{"runs": []}')
    with pytest.raises(ValueError, match="expected"):
        load_methods_file(bad)


def test_engine_plan_worked_example():
    target = MethodSpec("target", "none")
    ngram = MethodSpec("ngram", "ngram", {"method": "ngram"})
    eagle = MethodSpec("eagle", "eagle", {"method": "eagle"})
    plan = [(s.name, mode, temps) for s, mode, temps in engine_plan([target, ngram, eagle], [0.0, 1.0],
                                                                    ["greedy", "probabilistic"])]  # fmt: skip
    assert plan == [("target", None, [0.0, 1.0]), ("ngram", None, [0.0, 1.0]), ("eagle", "greedy", [0.0, 1.0]),
                    ("eagle", "probabilistic", [1.0])]  # fmt: skip
    # T=0 always drafts greedily; probabilistic alone at T=1 still gives a T=0 greedy engine.
    plan = [(mode, temps) for _, mode, temps in engine_plan([eagle], [0.0, 1.0], ["probabilistic"])]
    assert plan == [("greedy", [0.0]), ("probabilistic", [1.0])]


def test_reference_methods_file_resolves(target_config):
    """benchmarks/configs/smollm2-135m.json (the committed reference run) names valid rows."""
    entries, k, base = load_methods_file(CKPTS.parents[1] / "benchmarks" / "configs" / "smollm2-135m.json")
    specs = resolve_methods(entries, target_config=target_config, default_k=k, base_dir=base)
    assert [s.error for s in specs] == [None] * len(specs)
    assert [s.method for s in specs] == ["none", "ngram", "eagle", "hass", "coral", "fspad", "small-lm"]


def test_repeats_run_the_plan_in_turn_each_against_its_own_target(monkeypatch):
    from vllm_coral.workflows.bench import offline

    speeds = iter([100.0, 90.0, 50.0, 48.0])  # target, eagle; then the machine slows down by half
    calls = []

    def fake_engine(model, spec, mode, temps, datasets, settings, reference, label, log):
        calls.append(label)
        return [offline.OfflineRow("d", spec.name, spec.method, 0.0, mode, None, None, tokens_per_second=next(speeds))]

    monkeypatch.setattr(offline, "_run_engine", fake_engine)
    specs = [MethodSpec("target", "none"), MethodSpec("eagle", "eagle", {"method": "eagle"})]
    rows = offline.run_offline("m", specs, {"d": []}, temperatures=[0.0], draft_sample_methods=["greedy"], repeats=2)
    assert calls == ["[1/4] target", "[2/4] eagle (greedy)", "[3/4] target", "[4/4] eagle (greedy)"]
    assert [(r.method, r.repeat) for r in rows] == [("target", 0), ("eagle", 0), ("target", 1), ("eagle", 1)]
    assert [r.speedup for r in rows] == pytest.approx([1.0, 0.9, 1.0, 0.96])
    with pytest.raises(offline.BenchError, match="repeats must be at least 1"):
        offline.run_offline("m", specs, {"d": []}, temperatures=[0.0], draft_sample_methods=["greedy"], repeats=0)

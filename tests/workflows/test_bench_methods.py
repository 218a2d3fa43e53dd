"""Method rows: validated before any engine starts; a bad row is an error row, not a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_coral.demo import shipped_methods
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


def _resolve_committed_config(name: str, target_config: dict):
    """(entries, base folder, specs) of a methods file under benchmarks/configs/, after
    checking that every row resolves without an error."""
    entries, k, base = load_methods_file(CKPTS.parents[1] / "benchmarks" / "configs" / name)
    specs = resolve_methods(entries, target_config=target_config, default_k=k, base_dir=base)
    assert [s.error for s in specs] == [None] * len(specs)
    return entries, base, specs


def test_reference_methods_file_resolves(target_config):
    """benchmarks/configs/smollm2-135m.json (the reference run's rows, and the demo's) names
    valid rows: every checkpoint exists, matches the target and holds the method its row names."""
    entries, base, specs = _resolve_committed_config("smollm2-135m.json", target_config)
    assert [s.method for s in specs] == ["none", "ngram", "coral-router", "coral-router", "hass", "eagle", "eagle3",
                                         "fspad", "coral-router", "small-lm"]  # fmt: skip
    # The demo serves the same rows (less the target, which it adds itself, with draft_model).
    shipped, base_dir = shipped_methods("smollm2-135m")
    assert base_dir == base and shipped == entries[1:]
    assert shipped_methods("no-such-target") == ([], Path.cwd())


def test_product_study_methods_file_resolves(target_config):
    """benchmarks/configs/smollm2-135m-product.json (the product drafter beside its own bases)
    names checkpoints that exist and match; only the product row follows the k sweep."""
    entries, _, _ = _resolve_committed_config("smollm2-135m-product.json", target_config)
    assert [e["name"] for e in entries if "num_speculative_tokens" not in e] == ["target", "CORAL-warm (product)"]


def _fake_engines(monkeypatch, speeds: dict[str, list[float]], fail: str | None = None):
    """Engines that record every timed pass as (engine, row method, repeat) and take their
    tokens/s from ``speeds[engine]`` in turn; ``fail`` names an engine whose passes crash."""
    from contextlib import contextmanager

    from vllm_coral.plugin import engine
    from vllm_coral.workflows.bench import offline

    passes, speeds = [], {name: iter(values) for name, values in speeds.items()}

    @contextmanager
    def fake_open(**kwargs):
        name = (kwargs["speculative_config"] or {}).get("method", "target")
        yield type("LLM", (), {"name": name, "vllm_coral_startup_s": 1.0})()

    def fake_dataset(llm, prompts, row, settings, *, warmup, desc):
        passes.append((llm.name, row.method, row.repeat))
        if llm.name == fail:
            raise RuntimeError("boom")
        row.tokens_per_second = next(speeds[llm.name])
        return {"r": [1, 2]}, {"r": [0]}

    monkeypatch.setattr(engine, "engine_kwargs", lambda model, **kw: kw)
    monkeypatch.setattr(engine, "open_llm", fake_open)
    monkeypatch.setattr(offline, "_run_dataset", fake_dataset)
    return passes


def test_every_method_pass_is_paired_with_an_adjacent_target_pass(monkeypatch):
    from vllm_coral.workflows.bench import offline

    # The machine slows down by half after the first pair: paired ratios stay 0.9-0.96.
    passes = _fake_engines(monkeypatch, {"target": [100.0, 100.0, 50.0, 50.0], "eagle": [90.0, 48.0, 47.0]})
    specs = [MethodSpec("target", "none"), MethodSpec("eagle", "eagle", {"method": "eagle"})]
    rows = offline.run_offline("m", specs, {"d": []}, temperatures=[0.0], draft_sample_methods=["greedy"], repeats=3)
    # target's own pass, then pairs in alternating order: T M, M T, T M.
    assert passes == [("target", "target", 0), ("target", "target", 0), ("eagle", "eagle", 0),
                      ("eagle", "eagle", 1), ("target", "target", 1), ("target", "target", 2), ("eagle", "eagle", 2)]
    assert [(r.method, r.repeat) for r in rows] == [("target", 0), ("eagle", 0), ("eagle", 1), ("eagle", 2)]
    assert [r.speedup for r in rows] == pytest.approx([1.0, 0.9, 0.96, 0.94])
    assert [r.baseline_tokens_per_second for r in rows] == [None, 100.0, 50.0, 50.0]
    assert [r.guard["identical"] for r in rows[1:]] == [1, 1, 1]  # against the target's own first pass
    with pytest.raises(offline.BenchError, match="repeats must be at least 1"):
        offline.run_offline("m", specs, {"d": []}, temperatures=[0.0], draft_sample_methods=["greedy"], repeats=0)


def test_a_failing_method_is_a_row_error_and_a_failing_target_stops_the_run(monkeypatch):
    from vllm_coral.workflows.bench import offline

    specs = [MethodSpec("target", "none"), MethodSpec("eagle", "eagle", {"method": "eagle"})]
    _fake_engines(monkeypatch, {"target": [100.0] * 4}, fail="eagle")
    rows = offline.run_offline("m", specs, {"d": []}, temperatures=[0.0], draft_sample_methods=["greedy"], repeats=2)
    assert [(r.method, r.error, r.speedup) for r in rows] == [
        ("target", None, 1.0), ("eagle", "generation failed: RuntimeError: boom", None),
        ("eagle", "generation failed: RuntimeError: boom", None)]
    _fake_engines(monkeypatch, {}, fail="target")
    with pytest.raises(offline.BenchError, match="the target alone failed, nothing to compare with: RuntimeError: boom"):
        offline.run_offline("m", specs, {"d": []}, temperatures=[0.0], draft_sample_methods=["greedy"])

"""The engine step-phase timer: its shared file, its scopes, and who installs it.

The real-vLLM side (an engine's scopes land in its own file) is checked in
``tests/vllm/test_bench_cli.py``; here the timer runs without vLLM.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from vllm_coral.plugin import phases
from vllm_coral.plugin.phases import PHASES, PhaseTimes, create_phase_file, read_phases


def _file_of_another_process(path):
    """A phase file as ``open_llm`` makes it, but created by some other pid (the engine
    process is not the one that created its file)."""
    create_phase_file(path)
    data = bytearray(path.read_bytes())
    data[8:16] = struct.pack("<q", os.getpid() + 1)
    path.write_bytes(bytes(data))
    return path


def test_a_new_file_reads_as_zeros(tmp_path):
    times = read_phases(create_phase_file(tmp_path / "p.bin"))
    assert set(times.seconds) == set(PHASES) and not any(times.seconds.values()) and times.steps == 0


def test_scopes_add_up_nested_ones_once_unknown_ones_as_other(tmp_path, monkeypatch):
    path = _file_of_another_process(tmp_path / "p.bin")
    monkeypatch.setenv(phases.ENV, str(path))
    timer = phases._timer_from_env()
    assert timer is not None
    for _ in range(3):
        with timer("gpu_model_runner: forward"):
            with timer("gpu_model_runner: sample"):  # nested: inside forward's time only
                time.sleep(0.002)
        with timer("gpu_model_runner: draft"):
            time.sleep(0.001)
        with timer("gpu_model_runner: eplb"):
            pass
    got = read_phases(path)  # another reader, as the process that opened the engine
    assert got.steps == 3 and got.counts["draft"] == 3 and got.counts["other"] == 3 and got.counts["sample"] == 0
    assert got.seconds["forward"] >= 0.006 and got.seconds["draft"] >= 0.003 and got.seconds["sample"] == 0.0
    # Snapshots subtract, like vLLM's counters.
    with timer("gpu_model_runner: forward"):
        pass
    delta = read_phases(path) - got
    assert delta.steps == 1 and delta.counts["draft"] == 0


def test_the_creating_process_is_never_timed(tmp_path, monkeypatch):
    """With VLLM_ENABLE_V1_MULTIPROCESSING=0 every engine of a process would share one
    file, so the process that created it times nothing (and neither does one without it)."""
    monkeypatch.setenv(phases.ENV, str(create_phase_file(tmp_path / "mine.bin")))
    assert phases._timer_from_env() is None
    monkeypatch.setenv(phases.ENV, str(tmp_path / "missing.bin"))
    assert phases._timer_from_env() is None
    monkeypatch.setenv(phases.ENV, str(_file_of_another_process(tmp_path / "p.bin")))
    monkeypatch.setenv("VLLM_CUSTOM_SCOPES_FOR_PROFILING", "1")  # vLLM's own profiler scopes win
    assert phases._timer_from_env() is None


def test_a_file_of_another_layout_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0" * 40)
    with pytest.raises(ValueError, match=r"x.bin: not a vllm-coral phase file \(40 bytes"):
        read_phases(tmp_path / "x.bin")


def test_times_add_and_round_trip():
    a = PhaseTimes({"forward": 1.0, "draft": 0.5}, {"forward": 10, "draft": 10})
    b = PhaseTimes({"forward": 2.0}, {"forward": 20})
    total = a + b
    assert total.steps == 30 and total.seconds == {"forward": 3.0, "draft": 0.5}
    assert PhaseTimes.from_dict(total.to_dict()) == total
    assert (total - a).seconds == {"forward": 2.0, "draft": 0.0}

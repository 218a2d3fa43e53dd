"""Where the time of a vLLM step goes: wall-clock totals per phase, from inside the engine.

vLLM 0.32's model runner marks the phases of every step with
``record_function_or_nullcontext("gpu_model_runner: <phase>")`` (``preprocess``: inputs and
attention metadata; ``forward``: the target's layers; ``postprocess``: its LM head;
``sample``: sampling, or the rejection sampler's verification of a draft; ``draft``: the
drafter's ``propose``, every draft position; ``bookkeep``: outputs back to the requests).
Those scopes are no-ops unless a profiler is asked for: the function they call is the
module global ``vllm.v1.utils._PROFILER_FUNC``, set on first use. :func:`install` sets it
first, so that in an engine process a timer adds each scope's wall-clock time
(``time.perf_counter``; CPU ops are synchronous) to a small file shared with the process
that opened the engine.

The file is a fixed layout of float64 pairs (seconds, count) per phase after a 16-byte
header (magic, pid of the creating process), memory-mapped by the engine's worker and read
by :func:`read_phases`, so a scope costs one ``perf_counter`` pair and two stores (~1.5 µs
measured, against steps of tens of ms) and the
reader always sees the totals of every finished scope. Totals are cumulative per engine:
measure a run as the difference of two snapshots, like vLLM's counters.

``open_llm`` gives every engine its own file: it names it in ``VLLM_CORAL_PHASE_FILE``
while ``vllm.LLM`` starts the engine processes (they inherit the environment). The
plugin's ``register()`` calls :func:`install` in every process, which leaves a resolver in
``_PROFILER_FUNC``; the first scope that runs in a process (only engine processes run
any) replaces it with the timer of that process's file, or with vLLM's own choice. Scopes
nested in another are not counted twice (only the outermost is timed); names not listed
in :data:`PHASES` go to ``other``.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ENV", "PHASES", "PhaseTimes", "create_phase_file", "install", "read_phases"]

ENV = "VLLM_CORAL_PHASE_FILE"
PHASES = ("preprocess", "forward", "postprocess", "sample", "draft", "bookkeep", "other")
_MAGIC = b"VCPHASE1"
_PREFIX = "gpu_model_runner: "
_HEADER = len(_MAGIC) + 8  # magic, then the pid of the process that created the file
_SLOT = {name: _HEADER + 16 * i for i, name in enumerate(PHASES)}
_SIZE = _HEADER + 16 * len(PHASES)


@dataclass(frozen=True)
class PhaseTimes:
    # phase -> wall-clock seconds spent in it.
    seconds: dict[str, float] = field(default_factory=dict)
    # phase -> number of scopes timed (``forward``: target forwards, i.e. engine steps).
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.counts.get("forward", 0)

    def __sub__(self, other: PhaseTimes) -> PhaseTimes:
        return PhaseTimes(
            {k: v - other.seconds.get(k, 0.0) for k, v in self.seconds.items()},
            {k: v - other.counts.get(k, 0) for k, v in self.counts.items()},
        )

    def __add__(self, other: PhaseTimes) -> PhaseTimes:
        names = dict.fromkeys([*self.seconds, *other.seconds])
        return PhaseTimes(
            {k: self.seconds.get(k, 0.0) + other.seconds.get(k, 0.0) for k in names},
            {k: self.counts.get(k, 0) + other.counts.get(k, 0) for k in names},
        )

    def to_dict(self) -> dict:
        return {"steps": self.steps, "seconds": dict(self.seconds), "counts": dict(self.counts)}

    @classmethod
    def from_dict(cls, d: dict) -> PhaseTimes:
        return cls(dict(d["seconds"]), {k: int(v) for k, v in d["counts"].items()})


def create_phase_file(path: str | Path) -> Path:
    """An all-zero phase file for one engine (the engine's worker fills it)."""
    path = Path(path)
    path.write_bytes(_MAGIC + struct.pack("<q", os.getpid()) + bytes(_SIZE - _HEADER))
    return path


def read_phases(path: str | Path) -> PhaseTimes:
    """The totals in a phase file; a file of another layout is refused in one line."""
    data = Path(path).read_bytes()
    if len(data) != _SIZE or not data.startswith(_MAGIC):
        raise ValueError(f"{path}: not a vllm-coral phase file ({len(data)} bytes, expected {_SIZE})")
    seconds, counts = {}, {}
    for name, off in _SLOT.items():
        s, n = struct.unpack_from("<dd", data, off)
        seconds[name], counts[name] = s, int(n)
    return PhaseTimes(seconds, counts)


class _Timer:
    """The ``_PROFILER_FUNC`` installed in an engine process: ``timer(name)`` is a scope."""

    def __init__(self, path: str):
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _SIZE)
        self._depth = 0

    def __call__(self, name: str) -> _Scope:
        return _Scope(self, _SLOT.get(name.removeprefix(_PREFIX), _SLOT["other"]))

    def add(self, off: int, seconds: float) -> None:
        s, n = struct.unpack_from("<dd", self._map, off)
        struct.pack_into("<dd", self._map, off, s + seconds, n + 1.0)


class _Scope:
    __slots__ = ("_timer", "_off", "_start")

    def __init__(self, timer: _Timer, off: int):
        self._timer, self._off = timer, off

    def __enter__(self) -> _Scope:
        self._timer._depth += 1
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self._start
        self._timer._depth -= 1
        if self._timer._depth == 0:
            self._timer.add(self._off, elapsed)


def install() -> None:
    """Put :func:`_resolve` in ``vllm.v1.utils._PROFILER_FUNC`` (``register()`` calls this
    in every process vLLM starts; a forked engine process inherits it from its parent)."""
    import vllm.v1.utils as vllm_utils

    if vllm_utils._PROFILER_FUNC is None:
        vllm_utils._PROFILER_FUNC = _resolve


def _resolve(name: str):
    """The first step scope in a process decides: the timer of ``VLLM_CORAL_PHASE_FILE``,
    or vLLM's own choice (a no-op, or its profiler scopes if asked for)."""
    import vllm.v1.utils as vllm_utils

    timer = _timer_from_env()
    vllm_utils._PROFILER_FUNC = timer
    if timer is None:
        return vllm_utils.record_function_or_nullcontext(name)
    return timer(name)


def _timer_from_env() -> _Timer | None:
    """The timer for ``VLLM_CORAL_PHASE_FILE``, or None: without the variable, in the
    process that created the file (the one opening the engine: with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` several engines would share it, so nothing is
    timed there), or when vLLM's own profiling scopes were asked for
    (``VLLM_CUSTOM_SCOPES_FOR_PROFILING`` / ``VLLM_NVTX_SCOPES_FOR_PROFILING``)."""
    path = os.environ.get(ENV)
    if not path or not os.path.exists(path):
        return None
    if any(os.environ.get(v, "0") not in ("", "0") for v in ("VLLM_CUSTOM_SCOPES_FOR_PROFILING",
                                                           "VLLM_NVTX_SCOPES_FOR_PROFILING")):  # fmt: skip
        return None
    head = Path(path).read_bytes()[:_HEADER]
    if len(head) != _HEADER or not head.startswith(_MAGIC) or struct.unpack("<q", head[8:])[0] == os.getpid():
        return None
    return _Timer(path)

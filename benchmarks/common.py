"""Helpers shared by the benchmark scripts: timing, and the metadata every result records."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vllm_coral.workflows.bench.report import cpu_name, now_utc
from vllm_coral.workflows.bench.report import git_sha as _git_sha

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "cpu_name", "device_name", "git_sha", "now_utc", "time_us", "write_outputs"]


def time_us(fn, device: str, reps: int) -> float:
    """Median wall time of ``fn()`` in µs (triton.testing.do_bench on CUDA)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU: {cpu_name()}, {torch.get_num_threads()} threads"


def git_sha() -> str:
    return _git_sha(mark_dirty=False)


def write_outputs(out: Path, stem: str, result: dict, to_markdown, plot) -> None:
    """``out/<stem>.json`` (every row), ``.md`` (the table, also printed) and ``.png``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(to_markdown(result))
    plot(result, out / f"{stem}.png")
    print(to_markdown(result))
    print(f"wrote {out}/{stem}.{{json,md,png}}", file=sys.stderr)

"""The training loop's process memory on the CPU, step by step, with and without its heap guard.

    python benchmarks/trainer_memory.py --out benchmarks/results/trainer-memory           # ~20 min on 2 cores
    python benchmarks/trainer_memory.py --steps 10 --arms shipped none --out /tmp/trainer-memory   # ~1 min

Every batch has a new [B, S, H] shape. oneDNN (bf16 matmuls) caches a primitive per shape
(1,024 by default) and glibc's heap fragments, so the process grew step after step; the
loop caps oneDNN's cache (``ONEDNN_CACHE``) and hands freed heap pages back with
``malloc_trim`` every ``TRIM_EVERY`` steps. Arms, each a fresh process training the same
variant on the same batches:

- ``shipped``: the loop as it is (both guards);
- ``trim-only``: oneDNN's default cache, the heap trimmed;
- ``none``: neither guard (the "before");
- ``mmap1m``: neither guard, ``MALLOC_MMAP_THRESHOLD_=1048576`` (every tensor over 1 MB is
  its own mapping, returned at free: the usual alternative for the heap).

``--features`` trains on a real features folder (page cache and shapes as in a real run);
without it, on a synthetic one with real shapes (``bench_trainer.synthetic_features``).
Records RssAnon (``/proc/self/status``) and wall time after every step; reports seconds per
step and RssAnon at the start, the largest and at the end. Linux with glibc only.
Writes ``trainer_memory.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trainer import VARIANTS, synthetic_features, variant_config  # noqa: E402
from common import device_name, git_sha, now_utc, write_outputs  # noqa: E402

from vllm_coral.models.targets import fetch_target  # noqa: E402

_ONEDNN_DEFAULT = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}
# arm -> (trim the heap, environment)
ARMS = {"shipped": (True, {}), "trim-only": (True, _ONEDNN_DEFAULT), "none": (False, _ONEDNN_DEFAULT),
        "mmap1m": (False, {**_ONEDNN_DEFAULT, "MALLOC_MMAP_THRESHOLD_": "1048576"})}


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def child(args) -> None:
    """One arm: train ``args.variant`` for ``args.steps`` steps, recording memory after each."""
    import vllm_coral.training.loop as loop_mod

    if not ARMS[args.child][0]:
        loop_mod.TRIM_EVERY = 10**9
    trace, step_fn = [], loop_mod._step

    def traced(r, step):
        terms = step_fn(r, step)
        trace.append(dict(step=step + 1, seconds=time.perf_counter(), rss_anon_mb=rss_anon_mb()))
        return terms

    loop_mod._step = traced
    recipe, cfg = variant_config(args.variant)
    loop = loop_mod.LoopConfig(epochs=args.epochs, max_steps=args.steps, batch_tokens=args.batch_tokens, lr=1e-3,
                               dtype=args.dtype, device="cpu", save_every=10**9, warmup_steps=1)  # fmt: skip
    start = dict(step=0, seconds=time.perf_counter(), rss_anon_mb=rss_anon_mb())
    loop_mod.run(recipe, cfg, loop, args.target, args.features,
                 Path(args.log).parent / "run", progress=False)  # fmt: skip
    Path(args.log).write_text(json.dumps([start] + trace))


def summarize(arm: str, trace: list[dict]) -> dict:
    steps = [b["seconds"] - a["seconds"] for a, b in zip(trace[1:], trace[2:])]  # the first step warms up
    rss = [t["rss_anon_mb"] for t in trace[1:]]
    return dict(arm=arm, trim=ARMS[arm][0], env=ARMS[arm][1], steps=len(trace) - 1,
                seconds_per_step=statistics.median(steps), rss_first_mb=rss[0], rss_max_mb=max(rss), rss_last_mb=rss[-1])  # fmt: skip


def to_markdown(result: dict) -> str:
    lines = [f"# Training-loop memory on the CPU ({result['variant']}, {result['steps']} steps, {result['dtype']})", "",
             f"{result['device']}; features: {result['features']}; git {result['git']}, {result['date']}", "",
             "| arm | s/step (median) | RssAnon after step 1 | largest | last |", "|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['seconds_per_step']:.2f} | {r['rss_first_mb']:,.0f} MB | "
                     f"{r['rss_max_mb']:,.0f} MB | {r['rss_last_mb']:,.0f} MB |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, trace in result["traces"].items():
        ax.plot([t["step"] for t in trace], [t["rss_anon_mb"] / 1024 for t in trace], label=arm)
    ax.set(xlabel="step", ylabel="RssAnon (GB)", title=f"Trainer memory, {result['variant']} on the CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--features", type=Path, default=None, help="a real features folder (default: synthetic)")
    p.add_argument("--target", type=Path, default=None, help="target folder (default: the embedded SmolLM2)")
    p.add_argument("--variant", default="hass-v8k", choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--epochs", type=int, default=20, help="passes (synthetic features are small)")
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    args.target = args.target or fetch_target("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = json.loads((Path(args.target) / "config.json").read_text())
        features = args.features or synthetic_features(work / "features", 160, config["hidden_size"],
                                                       config["vocab_size"])  # fmt: skip
        traces = {}
        for arm in args.arms:
            log = work / arm / "trace.json"
            log.parent.mkdir()
            cmd = [sys.executable, __file__, "--out", str(args.out), "--child", arm, "--log", str(log),
                   "--features", str(features), "--target", str(args.target), "--variant", args.variant,
                   "--steps", str(args.steps), "--epochs", str(args.epochs), "--batch-tokens", str(args.batch_tokens),
                   "--dtype", args.dtype]  # fmt: skip
            subprocess.run(cmd, check=True, env={**os.environ, **ARMS[arm][1]})
            traces[arm] = json.loads(log.read_text())
            print(f"{arm}: {summarize(arm, traces[arm])}", file=sys.stderr)
    result = dict(device=device_name("cpu"), git=git_sha(), date=now_utc(), variant=args.variant, steps=args.steps,
                  dtype=args.dtype, batch_tokens=args.batch_tokens,
                  features="real" if args.features else "synthetic (160 sequences of 128-768 tokens)",
                  torch=torch.__version__, rows=[summarize(a, t) for a, t in traces.items()], traces=traces)  # fmt: skip
    write_outputs(args.out, "trainer_memory", result, to_markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

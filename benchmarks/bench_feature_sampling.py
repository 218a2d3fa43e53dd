"""Benchmark FSPAD's fused feature sampling against the unfused torch twin, per drafting step.

    python benchmarks/bench_feature_sampling.py                      # preset for this device
    python benchmarks/bench_feature_sampling.py --preset full --out benchmarks/results/gpu   # a GPU
    python benchmarks/bench_feature_sampling.py --preset smoke --out /tmp/bench    # seconds
    python benchmarks/bench_feature_sampling.py --threads 1 --out benchmarks/results/cpu-dev  # busy CPU

One drafting step computes g = silu(E[x] @ W_gate.T) * (rmsnorm(h) @ W_up.T) [T, I] for T
tokens (``vllm_coral/kernels/feature_sampling.py`` has the maths and the fusion boundary).
Providers, one line each per (shape, T):
- ``gemm``: only the two projections, one batched torch GEMM on inputs already gathered
  and normalised; what reading the weights costs torch with nothing else around it.
- ``twin``: ``vllm_coral.kernels.reference.feature_sampling_ref``, the unfused op (gather,
  RMSNorm, two GEMMs, silu, product) and the CPU path.
- ``triton``: ``vllm_coral.kernels.feature_sampling.feature_sampling`` (CUDA only; without
  CUDA its rows say ``skipped`` and why).

Shapes: SmolLM2-135M (H=576, I=1536, V=49152) and an 8B-class Llama (H=4096, I=14336,
V=128256), T in (1, 4, 16, 64). Every provider is charged the op's compulsory bytes (both
weights, E[x], h, the norm weight, the ids and g), so GB/s and "% of peak" say how close
each gets to the bandwidth limit of the op itself. Peak is the GPU's data-sheet figure, or
on CPU a measured large copy. On CUDA every provider is also timed inside a CUDA graph
(``us_graph``), as vLLM replays drafting steps, which removes most launch overhead.

Writes ``feature_sampling.json`` (device, versions, every row), ``feature_sampling.md``
(the table, plus the bytes the fusion avoids) and ``feature_sampling.png`` (µs vs T).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_grouped_lm_head import _peak_gbps  # noqa: E402
from benchmarks.common import device_name, git_sha, now_utc, time_us, write_outputs  # noqa: E402
from vllm_coral.kernels.reference import feature_sampling_ref  # noqa: E402

SHAPES = {
    "smollm2": dict(H=576, I=1536, V=49152),
    "8b": dict(H=4096, I=14336, V=128256),
    "tiny": dict(H=64, I=160, V=1000),
}
PRESETS = {
    # The grid named in the issue.
    "full": dict(shapes=["smollm2", "8b"], T=[1, 4, 16, 64]),
    # What 2 busy CPU cores sweep in seconds (the 8B table alone is 1 GB in bf16).
    "cpu": dict(shapes=["smollm2"], T=[1, 4, 16, 64]),
    # For tests.
    "smoke": dict(shapes=["tiny"], T=[1, 4]),
}
EPS = 1e-5


def _inputs(shape: dict, T: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> dict:
    H, I, V = shape["H"], shape["I"], shape["V"]

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(dtype).to(device)

    return dict(
        token_ids=torch.randint(0, V, (T,), generator=gen).to(device),
        hidden=rand(T, H),
        embedding=rand(V, H),
        gate_weight=rand(I, H, scale=H**-0.5),
        up_weight=rand(I, H, scale=H**-0.5),
        norm_weight=rand(H),
    )


def _providers(device: str) -> tuple[dict, dict[str, str]]:
    """(name -> fn(inputs) for the ones that run here, name -> reason for the skipped)."""

    def gemm(a):
        x = torch.stack((a["embedding"][: a["hidden"].shape[0]], a["hidden"]))  # [2, T, H], made once
        w = torch.stack((a["gate_weight"], a["up_weight"])).transpose(1, 2)  # [2, H, I] view of a copy
        return lambda: torch.bmm(x, w)

    def twin(a):
        return lambda: feature_sampling_ref(**a, eps=EPS, validate=False)

    providers, skipped = {"gemm": gemm, "twin": twin}, {}
    if device == "cuda":
        from vllm_coral.kernels.feature_sampling import feature_sampling

        providers["triton"] = lambda a: (lambda: feature_sampling(**a, eps=EPS, validate=False))
    else:
        skipped["triton"] = "no CUDA: the Triton kernel runs on GPUs (the CPU path is the twin)"
    return providers, skipped


def _time(fn, device: str, reps: int) -> tuple[float, float | None]:
    """(µs, µs inside a CUDA graph or None on CPU)."""
    us = time_us(fn, device, reps)
    if device != "cuda":
        return us, None
    import triton.testing

    return us, triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def _row(name: str, shape_name: str, shape: dict, T: int, elem: int, peak: float, us, us_graph) -> dict:
    H, I = shape["H"], shape["I"]
    nbytes = (2 * I * H + 2 * T * H + H + T * I) * elem + 8 * T  # weights, E[x], h, w, g; ids
    saved = (4 * T * H + 6 * T * I) * elem  # e, rmsnorm(h), gate, up, silu(gate): write + read
    row = dict(provider=name, shape=shape_name, H=H, I=I, V=shape["V"], T=T, bytes=nbytes,
               weight_bytes=2 * I * H * elem, saved_bytes=saved, us=us, us_graph=us_graph)  # fmt: skip
    if us is not None:
        row.update(gbps=nbytes / (us * 1e-6) / 1e9, frac_peak=nbytes / (us * 1e-6) / 1e9 / peak)
    return row


def run(preset: str, dtype: torch.dtype, device: str, reps: int, peak_override: float | None, seed: int) -> dict:
    grid = PRESETS[preset]
    peak, peak_source = _peak_gbps(device, peak_override)
    providers, skipped = _providers(device)
    gen = torch.Generator().manual_seed(seed)
    elem = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for shape_name in grid["shapes"]:
        shape = SHAPES[shape_name]
        for T in grid["T"]:
            inputs = _inputs(shape, T, dtype, device, gen)
            for name, make in providers.items():
                us, us_graph = _time(make(inputs), device, reps)
                rows.append(_row(name, shape_name, shape, T, elem, peak, us, us_graph))
            for name, reason in skipped.items():
                rows.append(dict(_row(name, shape_name, shape, T, elem, peak, None, None), skipped=reason))
            del inputs
            if device == "cuda":
                torch.cuda.empty_cache()
    return dict(
        op="feature_sampling", preset=preset, dtype=str(dtype).replace("torch.", ""),
        device=device_name(device), device_kind=device, peak_gbps=peak, peak_source=peak_source,
        date=now_utc(), torch=torch.__version__, git_sha=git_sha(), skipped=skipped, rows=rows,
    )  # fmt: skip


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(result: dict) -> str:
    lines = [
        f"# feature_sampling on {result['device']}",
        "",
        f"{result['date']}, dtype {result['dtype']}, torch {result['torch']}, git {result['git_sha']}, "
        f"peak {result['peak_gbps']:.0f} GB/s ({result['peak_source']}). Bytes: the op's compulsory "
        "traffic (both weights, E[x], h, g). `us_graph`: inside a CUDA graph (CUDA only).",
        "",
        "| shape | H | I | T | provider | µs | µs graph | GB/s | % peak | × twin |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    twin = {(r["shape"], r["T"]): r["us"] for r in result["rows"] if r["provider"] == "twin"}
    for r in result["rows"]:
        key = f"| {r['shape']} | {r['H']} | {r['I']} | {r['T']} | {r['provider']} |"
        if r.get("skipped"):
            lines.append(f"{key} skipped | - | - | - | - |")
            continue
        base = twin.get((r["shape"], r["T"]))
        lines.append(
            f"{key} {r['us']:.1f} | {_fmt(r['us_graph'], '.1f')} | {r['gbps']:.1f} | {100 * r['frac_peak']:.0f} | "
            f"{_fmt(base / r['us'] if base else None, '.2f')} |"
        )
    for name, reason in result["skipped"].items():
        lines += ["", f"`{name}` skipped: {reason}."]
    lines += ["", "## What the fusion avoids: intermediates written and read back by the unfused op", "",
              "| shape | T | weight bytes | intermediate bytes | share |", "|---|---|---|---|---|"]  # fmt: skip
    seen = set()
    for r in result["rows"]:
        if (r["shape"], r["T"]) not in seen:
            seen.add((r["shape"], r["T"]))
            lines.append(f"| {r['shape']} | {r['T']} | {r['weight_bytes']:,} | {r['saved_bytes']:,} | "
                         f"{100 * r['saved_bytes'] / r['weight_bytes']:.1f}% |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["us"] is not None]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            for key, style in (("us", "-"), ("us_graph", "--")):
                pts = [(r["T"], r[key]) for r in rows if (r["shape"], r["provider"]) == (shape, provider) and r[key]]
                if pts:
                    xs, ys = zip(*sorted(pts))
                    ax.plot(xs, ys, style, marker="o", label=provider + (" (graph)" if key == "us_graph" else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens per drafting step)")
        ax.set_ylabel("µs")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"feature_sampling, {result['dtype']}, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: full on CUDA, cpu otherwise")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per point on CPU")
    parser.add_argument("--peak-gbps", type=float, default=None, help="override the bandwidth limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default torch's); 1 on a shared machine, where idle threads stall barriers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "local")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("full" if device == "cuda" else "cpu")
    result = run(preset, getattr(torch, args.dtype), device, args.reps, args.peak_gbps, args.seed)
    write_outputs(args.out, "feature_sampling", result, to_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

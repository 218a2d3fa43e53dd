"""Benchmark the grouped LM head against the dense head and a gather+matmul baseline.

    python benchmarks/bench_grouped_lm_head.py                      # preset for this device
    python benchmarks/bench_grouped_lm_head.py --preset full --out benchmarks/results/gpu
    python benchmarks/bench_grouped_lm_head.py --preset smoke --out /tmp/bench   # seconds

Providers, one line each per shape:
- ``dense``: the full head ``h @ W.T`` (cuBLAS on GPU, oneDNN/MKL on CPU); reads V*H.
- ``gather``: torch gathers the selected rows per token, then a batched matmul; re-reads
  weights per token and writes a copy of them.
- ``twin``: ``vllm_coral.kernels.reference.grouped_lm_head_ref`` (the CPU path).
- ``triton``: ``vllm_coral.kernels.grouped_lm_head.grouped_lm_head`` (CUDA only).
- ``triton_argmax``: the fused top-1 variant (CUDA only).

Bytes: the dense head reads V*H weights; every grouped provider is charged only the bytes
it must read, the union of the selected groups' rows times H (plus h), so "GB/s" and
"% of peak" say how close each gets to the memory-bandwidth limit of its own work. Peak
bandwidth is the device's data-sheet figure on known GPUs (or ``--peak-gbps``), and on CPU
a measured large-tensor copy (read + write bytes / time).

Writes ``grouped_lm_head.json`` (device, versions, every row), ``grouped_lm_head.md`` (table
plus the issue's targets where the headline shape was measured) and
``grouped_lm_head.png`` (µs vs k/N for the largest measured shape).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, git_sha, now_utc, time_us, write_outputs  # noqa: E402
from vllm_coral.kernels.reference import grouped_lm_head_ref  # noqa: E402

PRESETS = {
    # The grid named in the kernels issue.
    "full": dict(H=[576, 4096], V=[49152, 128256, 151936], N=[8, 16, 32, 64], k=[1, 2, 4], T=[1, 8, 64]),
    # What 2 CPU cores can sweep in a few minutes; includes the headline shape.
    "cpu": dict(H=[576, 4096], V=[49152, 128256], N=[8, 32], k=[1, 4], T=[1, 8]),
    # For tests: seconds.
    "smoke": dict(H=[64], V=[4000], N=[8], k=[1, 2], T=[1, 4]),
}
# Data-sheet HBM bandwidth, GB/s.
GPU_PEAK_GBPS = {"H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}
HEADLINE = dict(H=4096, V=128256, kN=1 / 8)


def _peak_gbps(device: str, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_GBPS.items():
            if key in name:
                return value, f"data sheet ({key})"
        return float("nan"), "unknown GPU"
    x = torch.empty(256 * 2**20 // 4, dtype=torch.float32)  # 256 MiB
    y = torch.empty_like(x)
    us = time_us(lambda: y.copy_(x), device, reps=10)
    return 2 * x.numel() * 4 / (us * 1e-6) / 1e9, "measured copy"


def _providers(device: str) -> dict:
    def dense(h, w, gids, G):
        return h @ w.T

    def gather(h, w, gids, G):
        rows = (gids.long()[:, :, None] * G + torch.arange(G, device=h.device)).clamp_max(w.shape[0] - 1)
        sel = w[rows.flatten(1)]  # [T, k*G, H] copy
        return torch.bmm(sel, h[:, :, None]).squeeze(-1)

    def twin(h, w, gids, G):
        return grouped_lm_head_ref(h, w, gids, G, check_duplicates=False)

    providers = {"dense": dense, "gather": gather, "twin": twin}
    if device == "cuda":
        from vllm_coral.kernels.grouped_lm_head import grouped_lm_head, grouped_lm_head_argmax

        providers["triton"] = lambda h, w, g, G: grouped_lm_head(h, w, g, G, validate=False)
        providers["triton_argmax"] = lambda h, w, g, G: grouped_lm_head_argmax(h, w, g, G, validate=False)
    return providers


def run(preset: str, dtype: torch.dtype, device: str, reps: int, peak_override: float | None, seed: int) -> dict:
    grid = PRESETS[preset]
    peak, peak_source = _peak_gbps(device, peak_override)
    providers = _providers(device)
    gen = torch.Generator().manual_seed(seed)
    elem = torch.tensor([], dtype=dtype).element_size()
    rows_out = []
    shapes = list(itertools.product(grid["H"], grid["V"]))
    cases = [(H, V, N, k, T) for H, V in shapes for N, k, T in itertools.product(grid["N"], grid["k"], grid["T"]) if k <= N]
    try:
        from tqdm import tqdm

        progress = tqdm(total=len(cases) * len(providers), desc="grouped_lm_head", file=sys.stderr)
    except ImportError:  # pragma: no cover
        progress = None
    dense_cache: dict[tuple, float] = {}
    for H, V in shapes:
        weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype).to(device)
        for N, k, T in itertools.product(grid["N"], grid["k"], grid["T"]):
            if k > N:
                continue
            G = -(-V // N)
            hidden = torch.randn(T, H, generator=gen).to(dtype).to(device)
            gids = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(T)]).to(device)
            union = torch.unique(gids).tolist()
            union_rows = sum(min(G, V - g * G) for g in union)
            for name, fn in providers.items():
                if name == "dense" and (H, V, T) in dense_cache:
                    us = dense_cache[(H, V, T)]
                else:
                    us = time_us(lambda: fn(hidden, weight, gids, G), device, reps)
                    if name == "dense":
                        dense_cache[(H, V, T)] = us
                weight_rows = V if name == "dense" else union_rows
                nbytes = (weight_rows * H + T * H) * elem
                gbps = nbytes / (us * 1e-6) / 1e9
                rows_out.append(
                    dict(provider=name, H=H, V=V, N=N, k=k, T=T, group_size=G, union_groups=len(union),
                         us=us, bytes=nbytes, gbps=gbps, frac_peak=gbps / peak)
                )  # fmt: skip
                if progress:
                    progress.update(1)
            del hidden
        del weight
        if device == "cuda":
            torch.cuda.empty_cache()
    if progress:
        progress.close()
    return dict(
        op="grouped_lm_head",
        preset=preset,
        dtype=str(dtype).replace("torch.", ""),
        device=device_name(device),
        device_kind=device,
        peak_gbps=peak,
        peak_source=peak_source,
        date=now_utc(),
        torch=torch.__version__,
        git_sha=git_sha(),
        rows=rows_out,
    )


def _speedups(result: dict) -> list[dict]:
    """Per grouped shape: each provider's speedup over dense and over gather."""
    by = {}
    for r in result["rows"]:
        by.setdefault((r["H"], r["V"], r["N"], r["k"], r["T"]), {})[r["provider"]] = r
    out = []
    for key, provs in sorted(by.items()):
        for name, r in provs.items():
            if name in ("dense", "gather"):
                continue
            out.append(dict(r, vs_dense=provs["dense"]["us"] / r["us"], vs_gather=provs["gather"]["us"] / r["us"]))
    return out


def to_markdown(result: dict) -> str:
    lines = [
        f"# grouped_lm_head on {result['device']}",
        "",
        f"{result['date']}, dtype {result['dtype']}, torch {result['torch']}, git {result['git_sha']}, "
        f"peak {result['peak_gbps']:.0f} GB/s ({result['peak_source']}).",
        "",
        "| H | V | N | k | T | provider | µs | GB/s | % peak | × dense | × gather |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    speed = {(r["H"], r["V"], r["N"], r["k"], r["T"], r["provider"]): r for r in _speedups(result)}
    for r in result["rows"]:
        s = speed.get((r["H"], r["V"], r["N"], r["k"], r["T"], r["provider"]))
        vs_d = f"{s['vs_dense']:.2f}" if s else "-"
        vs_g = f"{s['vs_gather']:.2f}" if s else "-"
        lines.append(
            f"| {r['H']} | {r['V']} | {r['N']} | {r['k']} | {r['T']} | {r['provider']} | {r['us']:.1f} | "
            f"{r['gbps']:.1f} | {100 * r['frac_peak']:.0f} | {vs_d} | {vs_g} |"
        )
    head = [
        s for s in _speedups(result)
        if s["H"] == HEADLINE["H"] and s["V"] == HEADLINE["V"] and abs(s["k"] / s["N"] - HEADLINE["kN"]) < 1e-9 and s["T"] <= 8
    ]  # fmt: skip
    if head:
        lines += [
            "",
            "## Targets at H=4096, V=128256, k/N=1/8, T<=8 (kernels issue: >=80% of peak, >=5x dense, >=1.5x gather)",
            "",
            "| provider | N | k | T | % peak | × dense | × gather | all met |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in head:
            met = s["frac_peak"] >= 0.8 and s["vs_dense"] >= 5 and s["vs_gather"] >= 1.5
            lines.append(
                f"| {s['provider']} | {s['N']} | {s['k']} | {s['T']} | {100 * s['frac_peak']:.0f} | "
                f"{s['vs_dense']:.2f} | {s['vs_gather']:.2f} | {'yes' if met else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    H, V = max((r["H"], r["V"]) for r in rows)
    Ts = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(Ts), figsize=(5 * len(Ts), 4), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for provider in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted(
                (r["k"] / r["N"], r["us"]) for r in rows
                if (r["H"], r["V"], r["T"], r["provider"]) == (H, V, T, provider)
            )  # fmt: skip
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k / N (fraction of the head computed)")
        ax.set_ylabel("µs")
        ax.set_title(f"H={H} V={V} T={T}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"grouped_lm_head, {result['dtype']}, {result['device']}")
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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "local")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("full" if device == "cuda" else "cpu")
    result = run(preset, getattr(torch, args.dtype), device, args.reps, args.peak_gbps, args.seed)
    write_outputs(args.out, "grouped_lm_head", result, to_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

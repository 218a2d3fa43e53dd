"""Tile sweep of the grouped-LM-head Triton kernel on a GPU (kernel launch alone, and the
whole wrapper at its default tiles), to pick better tiles than the defaults.

    python benchmarks/gpu/tune_grouped_lm_head.py --out /tmp/tune     # ~3 min on an H200

Shapes: the kernels issue's headline (H=4096, V=128256, bf16) at k/N = 1/8 (N=8, k=1 and
N=32, k=4), T = 1 and 8. Every config: BLOCK_R x BLOCK_H x num_warps x num_stages; time
with triton.testing.do_bench (median). Writes tune.json and tune.md (best 5 per shape,
the default's time, the whole wrapper's time, and % of peak for the selected bytes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_grouped_lm_head import _peak_gbps  # noqa: E402
from vllm_coral.kernels import grouped_lm_head as glh  # noqa: E402

SHAPES = [(4096, 128256, 8, 1, 1), (4096, 128256, 8, 1, 8), (4096, 128256, 32, 4, 1), (4096, 128256, 32, 4, 8)]
GRID = dict(BLOCK_R=[16, 32, 64, 128], BLOCK_H=[64, 128, 256], num_warps=[4, 8], num_stages=[2, 3, 4])


def _bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    peak, _ = _peak_gbps("cuda", None)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for H, V, N, k, T in SHAPES:
        G = -(-V // N)
        weight = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=gen) / H**0.5
        hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16, generator=gen)
        gids = torch.stack([torch.randperm(N, device="cuda", generator=gen)[:k] for _ in range(T)]).int()
        selected = len(set(gids.flatten().tolist()))
        nbytes = selected * G * H * 2
        out = torch.empty((T, k * G), dtype=torch.float32, device="cuda")
        base = glh._blocks(T, H, G, k, weight.element_size())
        default_us = _bench(lambda: glh._launch(hidden, weight, gids, G, out, out, False, 0, base))
        wrapper_us = _bench(lambda: glh.grouped_lm_head(hidden, weight, gids, G, validate=False))
        dense_us = _bench(lambda: hidden @ weight.T)
        rows = []
        for br, bh, nw, ns in itertools.product(*GRID.values()):
            meta = {**base, "BLOCK_R": br, "BLOCK_H": bh, "num_warps": nw, "num_stages": ns}
            try:
                us = _bench(lambda: glh._launch(hidden, weight, gids, G, out, out, False, 0, meta))
            except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
                rows.append(dict(BLOCK_R=br, BLOCK_H=bh, num_warps=nw, num_stages=ns, error=str(e)[:120]))
                continue
            rows.append(dict(BLOCK_R=br, BLOCK_H=bh, num_warps=nw, num_stages=ns, us=us,
                             pct_peak=100 * nbytes / (us * 1e-6) / 1e9 / peak))  # fmt: skip
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        results.append(dict(H=H, V=V, N=N, k=k, T=T, bytes=nbytes, default=base, default_us=default_us,
                            wrapper_us=wrapper_us, dense_us=dense_us, best=ok[:5], configs=rows))  # fmt: skip
        print(f"H={H} V={V} N={N} k={k} T={T}: dense {dense_us:.1f} µs, wrapper {wrapper_us:.1f}, default kernel "
              f"{default_us:.1f}, best {ok[0]['us']:.1f} ({ok[0]})", flush=True)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, peak_gbps=peak)
    (args.out / "tune.json").write_text(json.dumps(dict(meta=meta, shapes=results), indent=1))
    lines = [f"# Grouped LM head tile sweep on {meta['device']} (peak {peak:.0f} GB/s)", "",
             "| shape (H, V, N, k, T) | dense µs | wrapper µs (default tiles) | kernel µs default | best kernel µs | "
             "% peak best | best tiles (R, H, warps, stages) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        b = r["best"][0]
        lines.append(f"| {r['H']}, {r['V']}, {r['N']}, {r['k']}, {r['T']} | {r['dense_us']:.1f} | {r['wrapper_us']:.1f} "
                     f"| {r['default_us']:.1f} | {b['us']:.1f} | {b['pct_peak']:.0f} "
                     f"| {b['BLOCK_R']}, {b['BLOCK_H']}, {b['num_warps']}, {b['num_stages']} |")  # fmt: skip
    (args.out / "tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

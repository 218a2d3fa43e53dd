"""Time one CORAL drafter step alone, dense LM head vs routed, at two vocabulary scales.

    python benchmarks/bench_coral_drafter_step.py                    # both shapes, this device
    python benchmarks/bench_coral_drafter_step.py --preset smoke --out /tmp/step   # seconds

One drafting step = the drafter body (fc + one Llama layer) on T rows (one new token per
request being drafted) + the logits path to a greedy draft token:

- ``dense``: ``argmax(h @ W.T)`` over the whole vocabulary (what an EAGLE drafter does);
- ``routed``: router ``W2(silu(W1 h) + h)``, top-k groups, then the grouped head's fused
  top-1 over the selected rows only (``vllm_coral.kernels.dispatch``: the torch twin on
  CPU, Triton on CUDA).

Shapes: ``smollm2`` is the real target's drafter (H=576, V=49152, fp32 as served on CPU);
``llama3-8b`` is a synthetic Llama-3-8B-sized drafter (H=4096, I=14336, V=128256, bf16)
with **random weights, for timing only**. The router is random too, so each of the T
rows picks unrelated groups; a trained router's picks are correlated across rows, so the
T>1 numbers here are the worst case for routing. The body runs on one position without a
KV cache: attention over a real context adds the same time to both providers.

Writes ``coral_drafter_step.json`` (device, versions, every row), ``.md`` and ``.png``
(step time and speedup vs k/N per shape).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import device_name, git_sha, now_utc, time_us, write_outputs  # noqa: E402
from vllm_coral.kernels.dispatch import grouped_lm_head_argmax  # noqa: E402
from vllm_coral.models.coral import Router, select_groups  # noqa: E402
from vllm_coral.models.eagle import EagleConfig, EagleDrafter  # noqa: E402

SHAPES = {
    "smollm2": (EagleConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                            head_dim=64, vocab_size=49152, rope_theta=100000.0), torch.float32),
    "llama3-8b": (EagleConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0),
                  torch.bfloat16),
}  # fmt: skip
PRESETS = {
    "default": dict(shapes=["smollm2", "llama3-8b"], N=[8, 16, 32, 64], k=[1, 2, 4], T=[1, 8]),
    "smoke": dict(shapes=["tiny"], N=[8], k=[1, 2], T=[1, 4]),
}
TINY = (EagleConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    vocab_size=4000), torch.float32)  # fmt: skip


def _body_step(body: EagleDrafter, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:  # -> [T, H]
    positions = torch.zeros(emb.shape[0], 1, dtype=torch.long, device=emb.device)
    return body(emb, feat, positions)[:, 0]


@torch.inference_mode()
def run(preset: str, device: str, reps: int, seed: int) -> dict:
    grid = PRESETS[preset]
    rows = []
    for shape in grid["shapes"]:
        cfg, dtype = TINY if shape == "tiny" else SHAPES[shape]
        torch.manual_seed(seed)
        body = EagleDrafter(cfg).to(device=device, dtype=dtype).eval()
        H, V = cfg.hidden_size, cfg.vocab_size
        head = torch.randn(V, H, device=device, dtype=dtype) * H**-0.5  # random, group-contiguous by fiat
        for T in grid["T"]:
            emb = torch.randn(T, 1, H, device=device, dtype=dtype)
            feat = torch.randn(T, 1, H, device=device, dtype=dtype)
            h = _body_step(body, emb, feat)
            body_us = time_us(lambda: _body_step(body, emb, feat), device, reps)
            dense_head_us = time_us(lambda: (h @ head.T).argmax(-1), device, reps)
            dense_us = time_us(lambda: (_body_step(body, emb, feat) @ head.T).argmax(-1), device, reps)
            rows.append(dict(shape=shape, H=H, V=V, T=T, provider="dense", N=None, k=None, us=dense_us,
                             body_us=body_us, head_us=dense_head_us))  # fmt: skip
            for N in grid["N"]:
                router = Router(H, N).to(device=device, dtype=dtype).eval()
                G = -(-V // N)
                for k in grid["k"]:
                    if k >= N:
                        continue

                    def routed_head(h=h, router=router, k=k, G=G):
                        return grouped_lm_head_argmax(h, head, select_groups(router(h), k), G, validate=False)[1]

                    def routed_step(router=router, k=k, G=G):
                        x = _body_step(body, emb, feat)
                        return grouped_lm_head_argmax(x, head, select_groups(router(x), k), G, validate=False)[1]

                    union = select_groups(router(h), k).unique().numel()
                    rows.append(dict(shape=shape, H=H, V=V, T=T, provider="routed", N=N, k=k,
                                     us=time_us(routed_step, device, reps), body_us=body_us,
                                     head_us=time_us(routed_head, device, reps), union_groups=union))  # fmt: skip
            print(f"{shape} T={T}: done", file=sys.stderr, flush=True)
        del body, head
    return dict(bench="coral_drafter_step", preset=preset, device=device_name(device), device_kind=device,
                date=now_utc(), torch=torch.__version__, git_sha=git_sha(), reps=reps, rows=rows)  # fmt: skip


def _with_speedup(result: dict) -> list[dict]:
    dense = {(r["shape"], r["T"]): r for r in result["rows"] if r["provider"] == "dense"}
    out = []
    for r in result["rows"]:
        d = dense[(r["shape"], r["T"])]
        out.append(dict(r, step_speedup=d["us"] / r["us"], head_speedup=d["head_us"] / r["head_us"],
                        head_share=r["head_us"] / r["us"]))  # fmt: skip
    return out


def to_markdown(result: dict) -> str:
    lines = [
        f"# CORAL drafter step: dense vs routed LM head ({result['device']})",
        "",
        f"{result['date']}, torch {result['torch']}, git {result['git_sha']}, median of {result['reps']} reps. "
        "Random weights (timing only); `head share` = LM-head part of the step time.",
        "",
        "| shape | H | V | T | provider | N | k | step µs | head µs | head share | step speedup | head speedup | groups read |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _with_speedup(result):
        lines.append(
            f"| {r['shape']} | {r['H']} | {r['V']} | {r['T']} | {r['provider']} | {r['N'] or '-'} | {r['k'] or '-'} | "
            f"{r['us']:.0f} | {r['head_us']:.0f} | {r['head_share']:.0%} | {r['step_speedup']:.2f}x | "
            f"{r['head_speedup']:.2f}x | {r.get('union_groups', '-')} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _with_speedup(result)
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for T in sorted({r["T"] for r in rows if r["shape"] == shape}):
            pts = sorted((r["k"] / r["N"], r["step_speedup"]) for r in rows
                         if r["shape"] == shape and r["T"] == T and r["provider"] == "routed")  # fmt: skip
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"T={T}")
        ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k / N (fraction of the head computed)")
        ax.set_ylabel("drafter step speedup vs dense head")
        ax.set_title(shape)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"CORAL routed drafter step, {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per point on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "local")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run(args.preset, device, args.reps, args.seed)
    write_outputs(args.out, "coral_drafter_step", result, to_markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

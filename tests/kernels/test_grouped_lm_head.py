"""Grouped LM head: the torch twin against dense logits, and the Triton kernel against
the twin (on CUDA when present, else under TRITON_INTERPRET=1 at tiny shapes).

Tolerance rule (flash-attention's): against an fp64 reference, the kernel's max error
must be at most 2x the error of torch computing the same thing at the same precision,
plus a floor of 1e-6 x max|logit| for the fp32 case where both errors are ~0. It holds
because both accumulate the same H products in fp32 and differ only in summation order
and, for bf16/fp16, in when the result is rounded (torch rounds its output to the input
dtype; the kernel keeps fp32), so the kernel is never worse than torch by more than the
order-of-summation noise.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vllm_coral.kernels.reference import (
    grouped_lm_head_argmax_ref,
    grouped_lm_head_ref,
    num_groups,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (T, H, V, N, k): tiny, ragged last group, k == N with an odd V, T past one token block.
SHAPES = [
    (1, 32, 96, 4, 1),
    (3, 48, 250, 8, 2),  # G = 32, last group 26 rows
    (5, 40, 97, 5, 5),  # k == N, odd sizes, G = 20, last group 17 rows
    (70, 32, 130, 4, 2),  # T > 64: two token blocks in the kernel
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _problem(T, H, V, N, k, dtype, seed=0, permute=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    group_size = -(-V // N)
    # k distinct groups per token
    group_ids = torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(T)])
    row_to_token = torch.randperm(V, generator=gen) if permute else None
    return hidden, weight, group_ids, group_size, row_to_token


def _dense_restricted(hidden, weight, group_ids, group_size, row_to_token):
    """fp64 oracle: dense logits of the original head, restricted to the chosen groups."""
    V = weight.shape[0]
    token_to_row = torch.empty(V, dtype=torch.long)
    rows = torch.arange(V)
    token_to_row[rows if row_to_token is None else row_to_token] = rows
    original = weight.double()[token_to_row]  # W in token order
    dense = hidden.double() @ original.T  # [T, V]
    return dense, token_to_row


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("permute", [False, True])
def test_reference_equals_dense_head_on_selected_groups(shape, permute):
    hidden, weight, gids, G, r2t = _problem(*shape, torch.float32, permute=permute)
    logits, token_ids = grouped_lm_head_ref(hidden, weight, gids, G, r2t)
    dense, _ = _dense_restricted(hidden, weight, gids, G, r2t)
    T, _, V, N, k = shape
    assert logits.shape == token_ids.shape == (T, k * G)
    valid = token_ids >= 0
    # Exactly the tokens of the selected groups, each once.
    for t in range(T):
        chosen = [r for g in gids[t].tolist() for r in range(g * G, min((g + 1) * G, V))]
        want = set(chosen if r2t is None else r2t[chosen].tolist())
        got = token_ids[t][valid[t]].tolist()
        assert len(got) == len(want) and set(got) == want
    torch.testing.assert_close(
        logits[valid].double(), dense.gather(1, token_ids.clamp_min(0))[valid], atol=1e-5, rtol=1e-5
    )
    assert torch.isneginf(logits[~valid]).all()


def test_reference_k_equals_n_is_the_dense_head():
    hidden, weight, _, G, r2t = _problem(4, 32, 97, 5, 5, torch.float32)
    gids = torch.arange(5).repeat(4, 1)
    logits, token_ids = grouped_lm_head_ref(hidden, weight, gids, G, r2t)
    dense, _ = _dense_restricted(hidden, weight, gids, G, r2t)
    full = torch.full((4, 97), float("nan"), dtype=torch.float64)
    valid = token_ids >= 0
    for t in range(4):
        full[t, token_ids[t][valid[t]]] = logits[t][valid[t]].double()
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)


def test_reference_argmax_matches_logits():
    hidden, weight, gids, G, r2t = _problem(6, 32, 250, 8, 3, torch.float32)
    values, ids = grouped_lm_head_argmax_ref(hidden, weight, gids, G, r2t)
    dense, _ = _dense_restricted(hidden, weight, gids, G, r2t)
    logits, token_ids = grouped_lm_head_ref(hidden, weight, gids, G, r2t)
    best = logits.argmax(1)
    assert ids.tolist() == token_ids.gather(1, best[:, None]).squeeze(1).tolist()
    torch.testing.assert_close(values.double(), dense.gather(1, ids[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(group_ids=torch.tensor([[1, 1]])), "duplicate group ids"),
        (lambda a: a.update(group_ids=torch.tensor([[0, 8]])), "out of range"),
        (lambda a: a.update(hidden=torch.randn(1, 31)), "hidden size 31"),
        (lambda a: a.update(group_ids=torch.tensor([[0.0, 1.0]])), "must be int32 or int64"),
        (lambda a: a.update(row_to_token=torch.arange(10)), "row_to_token must be"),
    ],
)
def test_bad_inputs_are_rejected_in_one_line(mutate, message):
    args = dict(
        hidden=torch.randn(1, 32),
        weight=torch.randn(250, 32),
        group_ids=torch.tensor([[0, 1]]),
        group_size=32,
        row_to_token=None,
    )
    mutate(args)
    with pytest.raises(ValueError, match=message) as exc:
        grouped_lm_head_ref(**args)
    assert "\n" not in str(exc.value)


def test_cpu_dispatch_never_imports_triton():
    code = (
        "import sys, torch\n"
        "from vllm_coral.kernels.dispatch import grouped_lm_head, grouped_lm_head_argmax\n"
        "h, w = torch.randn(2, 8), torch.randn(40, 8)\n"
        "g = torch.tensor([[0, 2], [1, 3]])\n"
        "grouped_lm_head(h, w, g, 10); grouped_lm_head_argmax(h, w, g, 10)\n"
        "sys.exit(1 if 'triton' in sys.modules else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- Triton kernel
triton_ok = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not triton_ok, reason="needs CUDA or TRITON_INTERPRET=1")


def _kernels():
    pytest.importorskip("triton")
    from vllm_coral.kernels import grouped_lm_head as mod

    return mod


def _to(device, *tensors):
    return [t.to(device) if t is not None else None for t in tensors]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, dtype):
    mod = _kernels()
    hidden, weight, gids, G, r2t = _problem(*shape, dtype)
    ref_logits, ref_ids = grouped_lm_head_ref(hidden, weight, gids, G, r2t)
    logits, ids = mod.grouped_lm_head(*_to(DEVICE, hidden, weight, gids), G, *_to(DEVICE, r2t))
    logits, ids = logits.cpu(), ids.cpu()
    assert ids.tolist() == ref_ids.tolist()
    valid = ids >= 0
    assert torch.isneginf(logits[~valid]).all()

    dense, _ = _dense_restricted(hidden, weight, gids, G, r2t)
    exact = dense.gather(1, ids.clamp_min(0))[valid]
    err_kernel = (logits[valid].double() - exact).abs().max().item()
    # torch at the same precision: a matmul in `dtype`, output rounded to `dtype`.
    err_torch = (ref_logits[valid].double() - exact).abs().max().item()
    floor = 1e-6 * exact.abs().max().item()
    assert err_kernel <= 2 * err_torch + floor, (err_kernel, err_torch)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_argmax_matches_reference(shape, dtype):
    mod = _kernels()
    hidden, weight, gids, G, r2t = _problem(*shape, dtype, seed=1)
    values, ids = mod.grouped_lm_head_argmax(*_to(DEVICE, hidden, weight, gids), G, *_to(DEVICE, r2t))
    dense, _ = _dense_restricted(hidden, weight, gids, G, r2t)
    ref_logits, ref_ids = grouped_lm_head_ref(hidden, weight, gids, G, r2t)
    allowed = ref_ids.clamp_min(0)
    best = dense.gather(1, allowed).masked_fill(ref_ids < 0, float("-inf")).max(1).values
    got = dense.gather(1, ids.cpu()[:, None]).squeeze(1)
    # The chosen token is the exact argmax, or within rounding of it (near-ties in bf16).
    slack = 2 * (ref_logits.double() - dense.gather(1, allowed)).abs().masked_fill(ref_ids < 0, 0).max()
    assert (best - got <= slack + 1e-9).all()
    assert (ref_ids == ids.cpu()[:, None]).any(1).all(), "argmax outside the selected groups"
    torch.testing.assert_close(values.cpu().double(), got, atol=float(slack) + 1e-6, rtol=0)


@needs_triton
def test_kernel_k_equals_n_is_the_dense_head():
    mod = _kernels()
    hidden, weight, _, G, _ = _problem(3, 48, 250, 8, 8, torch.float32)
    gids = torch.stack([torch.randperm(8) for _ in range(3)])
    logits, ids = mod.grouped_lm_head(*_to(DEVICE, hidden, weight, gids), G)
    full = torch.full((3, 250), float("nan"))
    valid = ids.cpu() >= 0
    for t in range(3):
        full[t, ids.cpu()[t][valid[t]]] = logits.cpu()[t][valid[t]]
    torch.testing.assert_close(full, hidden @ weight.T, atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernel_rejects_duplicate_groups():
    mod = _kernels()
    hidden, weight, _, G, _ = _problem(2, 32, 96, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="duplicate group ids"):
        mod.grouped_lm_head(*_to(DEVICE, hidden, weight, torch.tensor([[1, 1], [0, 2]])), G)

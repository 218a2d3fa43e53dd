"""Grouped LM head in Triton: logits (or the fused top-1) of only the selected vocabulary
groups, reading each selected group's weights once for all tokens that chose it.

Maths (see ``reference.py`` for the layout): W [V, H] is stored group-contiguous, group g
is rows ``[g*G, min((g+1)*G, V))``. For tokens t with selected groups ``group_ids[t, :k]``::

    logits[t, j*G + r] = h[t] . W[group_ids[t, j]*G + r]

Source: CORAL's LM-head router (ACL 2025) computes logits for the top-k of N weight groups
only; at batch 1 the LM head is memory-bound, so the cost falls to about k/N of the dense
head when the kernel reads nothing else.

Schedule: one program per (group g, block of BLOCK_R rows, block of BLOCK_T tokens). The
program first reads the tiny ``group_ids`` tile and leaves at once if no token in its block
chose g, so unselected groups cost no weight traffic. Otherwise it streams its
[BLOCK_R, H] weight tile once and multiplies it with all BLOCK_T hidden states
(``tl.dot``), then scatters each token's row to the slot j where that token chose g.
Tokens that did not choose g are computed and discarded: the op is bound by weight
bytes, and re-reading weights per token (the alternative) costs T times more traffic.
With T <= 64 there is a single token block, so every selected weight is read exactly once.

The fused argmax variant writes, per (token, group, row block), the block maximum and its
row instead of logits; a tiny torch reduction over [T, N * row_blocks] then picks the
winner, so the [T, k*G] logits never reach memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_coral.kernels.reference import check_grouped_lm_head_inputs, num_groups

__all__ = ["grouped_lm_head", "grouped_lm_head_argmax"]


@triton.jit
def _grouped_lm_head_kernel(
    # pointers
    h_ptr,  # [T, H]
    w_ptr,  # [V, H]
    gid_ptr,  # [T, K]
    out_ptr,  # logits [T, K*G] fp32, or block maxima [T, N * R_BLOCKS] fp32 (ARGMAX)
    arg_ptr,  # unused, or block argmax rows [T, N * R_BLOCKS] int32 (ARGMAX)
    # sizes
    T,
    H,
    V,
    K,
    G,
    R_BLOCKS,
    # strides
    stride_ht,
    stride_wv,
    stride_gt,
    stride_ot,
    # meta
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ARGMAX: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
):
    g = tl.program_id(0)
    rb = tl.program_id(1)
    tb = tl.program_id(2)

    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    t_mask = offs_t < T
    gids = tl.load(
        gid_ptr + offs_t[:, None] * stride_gt + offs_k[None, :],
        mask=t_mask[:, None] & (offs_k[None, :] < K),
        other=-1,
    )
    hit = gids == g  # [BLOCK_T, BLOCK_K]
    chose = tl.max(hit.to(tl.int32), axis=1) > 0  # [BLOCK_T]
    if tl.sum(chose.to(tl.int32), axis=0) == 0:
        return
    # Slot j where each token chose g (distinct ids per token, so at most one hit).
    slot = tl.sum(tl.where(hit, offs_k[None, :], 0), axis=1)  # [BLOCK_T]

    row0 = g * G
    group_rows = tl.minimum(G, V - row0)  # ragged last group
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # row within the group
    r_mask = offs_r < group_rows

    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        h = tl.load(
            h_ptr + offs_t[:, None] * stride_ht + offs_h[None, :],
            mask=(t_mask & chose)[:, None] & h_mask[None, :],
            other=0.0,
        )  # [BLOCK_T, BLOCK_H]
        w = tl.load(
            w_ptr + (row0 + offs_r)[None, :] * stride_wv + offs_h[:, None],
            mask=r_mask[None, :] & h_mask[:, None],
            other=0.0,
        )  # [BLOCK_H, BLOCK_R]
        if UPCAST:  # interpreter only: its bf16 tl.dot returns garbage (Triton 3.9)
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE_FP32 or UPCAST:  # fp32 inputs: no silent TF32 rounding on tensor cores
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)

    acc = tl.where(r_mask[None, :], acc, float("-inf"))
    if ARGMAX:
        best = tl.max(acc, axis=1)  # [BLOCK_T]
        best_r = tl.argmax(acc, axis=1)  # [BLOCK_T]
        col = g * R_BLOCKS + rb
        dst = offs_t * stride_ot + col
        keep = t_mask & chose
        tl.store(out_ptr + dst, best, mask=keep)
        tl.store(arg_ptr + dst, (row0 + rb * BLOCK_R + best_r).to(tl.int32), mask=keep)
    else:
        dst = offs_t[:, None] * stride_ot + slot[:, None] * G + offs_r[None, :]
        tl.store(out_ptr + dst, acc, mask=(t_mask & chose)[:, None] & (offs_r[None, :] < G))


def _blocks(num_tokens: int, hidden_size: int, group_size: int, k: int, elem_bytes: int = 2) -> dict[str, int]:
    """Tile sizes. tl.dot needs every dimension >= 16; one token block up to
    T = 64 (weights read once). For T <= 16 and 2-byte weights, 256-wide hidden tiles keep
    more weight bytes in flight per stage of Triton's pipeline: on an H200 at H=4096, V=128256,
    k/N=1/8, T=1 the kernel went from 59.8 to 45.3 µs (46% -> 60% of peak bandwidth;
    ``benchmarks/gpu/tune_grouped_lm_head.py``). Larger T or fp32 weights keep the
    measured 64-wide tiles, whose shared memory fits every T up to 64."""
    block_t = max(16, min(64, triton.next_power_of_2(num_tokens)))
    wide = block_t <= 16 and elem_bytes <= 2
    return dict(
        BLOCK_T=block_t,
        BLOCK_R=max(16, min(128, triton.next_power_of_2(group_size))),
        BLOCK_H=max(16, min(256 if wide else 64, triton.next_power_of_2(hidden_size))),
        BLOCK_K=max(2, triton.next_power_of_2(k)),
    )


def _launch(hidden, weight, group_ids, group_size, out, arg, argmax, r_blocks, meta):
    num_tokens, k = group_ids.shape
    grid = (
        num_groups(weight.shape[0], group_size),
        triton.cdiv(group_size, meta["BLOCK_R"]),
        triton.cdiv(num_tokens, meta["BLOCK_T"]),
    )
    _grouped_lm_head_kernel[grid](
        hidden, weight, group_ids, out, arg,
        num_tokens, weight.shape[1], weight.shape[0], k, group_size, r_blocks,
        hidden.stride(0), weight.stride(0), group_ids.stride(0), out.stride(0),
        ARGMAX=argmax,
        IEEE_FP32=weight.dtype == torch.float32,
        # bf16 products are exact in fp32, so upcasting changes nothing but the speed.
        UPCAST=not weight.is_cuda,
        **meta,
    )  # fmt: skip


def _prepare(hidden, weight, group_ids, group_size, row_to_token, validate):
    if validate:
        check_grouped_lm_head_inputs(hidden, weight, group_ids, group_size, row_to_token)
    return hidden.contiguous(), weight.contiguous(), group_ids.contiguous()


def grouped_lm_head(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H], group-contiguous rows
    group_ids: torch.Tensor,  # [T, k], distinct per row
    group_size: int,  # G = ceil(V / N)
    row_to_token: torch.Tensor | None = None,  # [V] int64; None = identity
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # logits [T, k*G] fp32, token_ids [T, k*G] int64
    """Triton twin of ``reference.grouped_lm_head_ref``. ``validate=False`` skips the
    host-side checks (they synchronise) for trusted inputs such as a router's top-k."""
    hidden, weight, group_ids = _prepare(hidden, weight, group_ids, group_size, row_to_token, validate)
    num_tokens, k = group_ids.shape
    meta = _blocks(num_tokens, weight.shape[1], group_size, k, weight.element_size())
    logits = torch.empty((num_tokens, k * group_size), dtype=torch.float32, device=hidden.device)
    _launch(hidden, weight, group_ids, group_size, logits, logits, False, 0, meta)
    # Token ids depend only on the selection: row = gid*G + r, masked past V.
    rows = group_ids.long()[:, :, None] * group_size + torch.arange(group_size, device=hidden.device)
    valid = rows < weight.shape[0]
    rows = rows.clamp_max(weight.shape[0] - 1)
    token_ids = rows if row_to_token is None else row_to_token.long()[rows]
    token_ids = torch.where(valid, token_ids, -1).reshape(num_tokens, k * group_size)
    return logits, token_ids


def grouped_lm_head_argmax(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [V, H], group-contiguous rows
    group_ids: torch.Tensor,  # [T, k], distinct per row
    group_size: int,
    row_to_token: torch.Tensor | None = None,  # [V] int64; None = identity
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:  # values [T] fp32, token_ids [T] int64
    """Fused top-1 over the selected groups; never writes the [T, k*G] logits."""
    hidden, weight, group_ids = _prepare(hidden, weight, group_ids, group_size, row_to_token, validate)
    num_tokens, k = group_ids.shape
    meta = _blocks(num_tokens, weight.shape[1], group_size, k, weight.element_size())
    r_blocks = triton.cdiv(group_size, meta["BLOCK_R"])
    cols = num_groups(weight.shape[0], group_size) * r_blocks
    best = torch.full((num_tokens, cols), float("-inf"), dtype=torch.float32, device=hidden.device)
    best_row = torch.zeros((num_tokens, cols), dtype=torch.int32, device=hidden.device)
    _launch(hidden, weight, group_ids, group_size, best, best_row, True, r_blocks, meta)
    values, col = best.max(dim=1)
    rows = best_row.gather(1, col[:, None]).squeeze(1).long()
    return values, rows if row_to_token is None else row_to_token.long()[rows]

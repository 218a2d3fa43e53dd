"""FSPAD feature sampling in Triton: the gated product of one drafting step in one kernel,
from token ids straight to g [T, I], with no embedding, norm or gate/up tensor in memory.

Maths (the twin, ``reference.feature_sampling_ref``, runs it op for op as torch does)::

    g = silu(E[x] @ W_gate.T) * (rmsnorm_w(h) @ W_up.T)       # [T, I]
    rmsnorm_w(h) = w * (h_fp32 * rsqrt(mean(h_fp32**2) + eps)).to(h.dtype)

for token ids x [T], h = fc(concat(e, f)) [T, H], E [V, H], W_gate and W_up [I, H] and the
norm weight w [H]. The sampler then adds ``h + g @ W_down.T``, outside this kernel.
Source: FSPAD (Baichuan, 2024), ``vllm_coral.models.fspad.FeatureSampler``.

Fusion boundary, in bytes moved per drafting step (bf16, b = 2 bytes; H100 3.35 TB/s)
------------------------------------------------------------------------------------
Both ways read W_gate and W_up, 2*I*H*b bytes, for 4*T*H*I FLOPs: T FLOP/byte, far under
the H100's ridge (~295 FLOP/byte), so at T = 1..64 the op is bound by weight bytes.
Unfused torch (embedding, RMSNorm, two GEMMs, silu, product: >= 6 kernels) also writes
and reads back e and rmsnorm(h) [T, H] and gate, up and silu(gate) [T, I]: 4*T*H + 6*T*I
elements this kernel never stores (it writes g once and reads E[x] and h)::

    shape                  weights   saved/token  saved at T=1 / 4 / 16 / 64 (share of weights)
    SmolLM2 H=576 I=1536   3.54 MB   23.0 KB      0.7% / 2.6% / 10% / 42%
    8B      H=4096 I=14336  235 MB   205 KB       0.09% / 0.35% / 1.4% / 5.6%

At SmolLM2's shape the weights stream in ~1.1 µs, less than one kernel launch, so the
unfused op is bound by its >= 6 launches (and their ramp-up and tails, also inside a CUDA
graph); fusing makes it one. At 8B (~70 µs of weights) fusion saves up to 5.6% of the
bytes plus the launches. In FSPAD's forward e = E[x] is also fc's input, so there e is
materialised anyway and gathering E[x] here costs what reading e would: the saving there
is 2*T*H + 6*T*I elements (rmsnorm(h) and the [T, I] intermediates).

Left outside, with the reason:
- W_down (and the residual): its reduction runs over I, the axis this kernel tiles, so
  fusing it makes every I-tile program emit a partial [T, H] sum (split-K: fp32 atomics
  or a workspace). Those partials cost cdiv(I, BLOCK_I)*T*H*4 bytes to save the 2*T*I*b
  bytes of g's round trip: a ratio of H/BLOCK_I >= H/64, at least 9x at SmolLM2 and
  64x at 8B, and the atomics are non-deterministic. A plain GEMM reads W_down at
  roofline and folds the residual into its epilogue: ``torch.addmm(h, g, W_down.T)``.
- fc (before): rmsnorm needs whole rows of h, and every I-tile program needs all of them,
  so fusing fc re-reads W_fc (2*H*H*b bytes: 1.3 MB at SmolLM2) once per program.

Schedule: one program per (block of BLOCK_I output columns, block of BLOCK_T tokens);
with T <= 64 there is one token block, so each gate/up weight is read exactly once. A
first loop over H sums h*h for the norm (h is a few KB to 0.5 MB, L2-resident); the
second loop over H gathers E[x] rows, normalises h tile by tile (rounded as torch rounds
it), and accumulates both projections with ``tl.dot`` in fp32. The epilogue applies
silu(gate) * up in fp32 and rounds once to the output dtype. BLOCK_I shrinks (64 -> 16)
until the grid covers the GPU's SMs: at SmolLM2 (I = 1536) 64-wide tiles would leave 108
of 132 H100 SMs idle in a bandwidth-bound op.

This module imports Triton: callers pick it for CUDA tensors and the twin otherwise, as
``vllm_coral.kernels.dispatch`` does for the other ops, so the CPU path never imports
Triton (the tests run this kernel on the CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_coral.kernels.reference import check_feature_sampling_inputs

__all__ = ["feature_sampling"]


@triton.jit
def _rne_bf16(x):
    """fp32 -> fp32 holding the nearest bf16 (ties to even), so the cast after it is exact.
    Interpreter only: its fp32 -> bf16 cast truncates (Triton 3.9); GPUs round to nearest."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16  # shifts keep it uint32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _feature_sampling_kernel(
    # pointers
    ids_ptr,  # [T] int32/int64 token ids
    h_ptr,  # [T, H]
    emb_ptr,  # [V, H] embedding table
    wg_ptr,  # [I, H] gate_proj weight
    wu_ptr,  # [I, H] up_proj weight
    wn_ptr,  # [H] RMSNorm weight
    out_ptr,  # [T, I]
    # sizes
    T,
    H,
    I,
    eps,
    # strides (the last dimension of every matrix is contiguous)
    stride_ht,
    stride_ev,
    stride_gi,
    stride_ui,
    stride_ot,
    # meta
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_H: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
    RNE_BF16: tl.constexpr,
):
    ib = tl.program_id(0)
    tb = tl.program_id(1)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    t_mask = offs_t < T
    i_mask = offs_i < I
    rows = tl.load(ids_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)  # E rows to gather

    # Pass 1: the norm's row statistic must be complete before up_proj can use any tile.
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        m = t_mask[:, None] & (offs_h[None, :] < H)
        x = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_h[None, :], mask=m, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(sumsq / H + eps)  # [BLOCK_T]

    # Pass 2: both projections, one [BLOCK_H, BLOCK_I] tile of each weight per step.
    acc_g = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_T, BLOCK_I), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        m = t_mask[:, None] & h_mask[None, :]
        e = tl.load(emb_ptr + rows[:, None] * stride_ev + offs_h[None, :], mask=m, other=0.0)
        x = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_h[None, :], mask=m, other=0.0)
        w = tl.load(wn_ptr + offs_h, mask=h_mask, other=0.0)
        # torch's rounding: normalised h to the input dtype, then the weight product too.
        xn = x.to(tl.float32) * rstd[:, None]
        if RNE_BF16:
            xn = _rne_bf16(xn)
        n = xn.to(x.dtype).to(tl.float32) * w.to(tl.float32)[None, :]
        if RNE_BF16:
            n = _rne_bf16(n)
        n = n.to(x.dtype)  # [BLOCK_T, BLOCK_H]
        wm = h_mask[:, None] & i_mask[None, :]
        wg = tl.load(wg_ptr + offs_i[None, :] * stride_gi + offs_h[:, None], mask=wm, other=0.0)
        wu = tl.load(wu_ptr + offs_i[None, :] * stride_ui + offs_h[:, None], mask=wm, other=0.0)
        if UPCAST:  # interpreter only: its bf16 tl.dot returns garbage (Triton 3.9)
            e = e.to(tl.float32)
            n = n.to(tl.float32)
            wg = wg.to(tl.float32)
            wu = wu.to(tl.float32)
        if IEEE_FP32 or UPCAST:  # fp32 inputs: no silent TF32 rounding on tensor cores
            acc_g = tl.dot(e, wg, acc_g, input_precision="ieee")
            acc_u = tl.dot(n, wu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(e, wg, acc_g)
            acc_u = tl.dot(n, wu, acc_u)

    out = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, rounded once below
    if RNE_BF16:
        out = _rne_bf16(out)
    dst = out_ptr + offs_t[:, None] * stride_ot + offs_i[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & i_mask[None, :])


def block_sizes(num_tokens: int, hidden_size: int, intermediate_size: int, num_sms: int) -> dict[str, int]:
    """Tile sizes (tl.dot needs every dimension >= 16). One token block up to T = 64, so
    weights are read once; the widest BLOCK_I whose grid still covers ``num_sms``.
    Registers, compiled for sm_90: with four warps and BLOCK_H = 64, 64x16 and 64x64
    accumulator tiles spill (256 and 824 bytes of stack). Eight warps from 1024-element
    tiles, and BLOCK_H = 32 for 64x64, spill nothing in bf16 (the tests check it)."""
    block_t = max(16, min(64, triton.next_power_of_2(num_tokens)))
    block_i = 16
    for width in (64, 32):
        if triton.cdiv(intermediate_size, width) >= num_sms:
            block_i = width
            break
    return dict(
        BLOCK_T=block_t,
        BLOCK_I=block_i,
        BLOCK_H=max(16, min(32 if block_t * block_i >= 4096 else 64, triton.next_power_of_2(hidden_size))),
        num_warps=8 if block_t * block_i >= 1024 else 4,
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Only copies when needed: the embedding table may be a GB.
    return t if t.stride(-1) == 1 else t.contiguous()


def feature_sampling(
    token_ids: torch.Tensor,  # [T] int32/int64, in [0, V)
    hidden: torch.Tensor,  # [T, H] h = fc(concat(e, f))
    embedding: torch.Tensor,  # [V, H] E, the target's token embedding
    gate_weight: torch.Tensor,  # [I, H]
    up_weight: torch.Tensor,  # [I, H]
    norm_weight: torch.Tensor,  # [H]
    eps: float,
    *,
    validate: bool = True,
) -> torch.Tensor:  # [T, I] in hidden.dtype
    """Triton twin of ``reference.feature_sampling_ref``. Shapes, dtypes and devices are
    always checked (host metadata only); ``validate=False`` skips the token-id range
    check, which synchronises, for trusted ids such as the previous step's samples."""
    check_feature_sampling_inputs(
        token_ids, hidden, embedding, gate_weight, up_weight, norm_weight, eps, check_ids=validate
    )
    num_tokens, hidden_size = hidden.shape
    inter = gate_weight.shape[0]
    out = torch.empty((num_tokens, inter), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0 or inter == 0:
        return out
    hidden, embedding, gate_weight, up_weight = map(_last_dim_contiguous, (hidden, embedding, gate_weight, up_weight))
    num_sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
    meta = block_sizes(num_tokens, hidden_size, inter, num_sms)
    grid = (triton.cdiv(inter, meta["BLOCK_I"]), triton.cdiv(num_tokens, meta["BLOCK_T"]))
    _feature_sampling_kernel[grid](
        token_ids.contiguous(), hidden, embedding, gate_weight, up_weight, norm_weight.contiguous(), out,
        num_tokens, hidden_size, inter, float(eps),
        hidden.stride(0), embedding.stride(0), gate_weight.stride(0), up_weight.stride(0), out.stride(0),
        IEEE_FP32=hidden.dtype == torch.float32,
        # bf16/fp16 products are exact in fp32, so upcasting changes nothing but the speed.
        UPCAST=not hidden.is_cuda,
        RNE_BF16=not hidden.is_cuda and hidden.dtype == torch.bfloat16,
        **meta,
    )  # fmt: skip
    return out

"""Feature sampling: the torch twin against a step-by-step fp64 computation and against
FSPAD's ``FeatureSampler`` module, and the Triton kernel against the twin (on CUDA when
present, else under TRITON_INTERPRET=1 at tiny shapes).

Tolerances. Oracle: the maths in fp64 from the same (rounded) inputs.
- Kernel vs oracle, flash-attention's rule: the kernel's max error is at most 2x the
  twin's (torch at the same precision) plus a floor of 1e-6 x max|g|. It holds because
  the kernel rounds h's normalisation and its weight product exactly as torch does, sums
  the same fp32 products in another order, then keeps gate, up and silu(gate) in fp32 and
  rounds once, where torch rounds each of them and the product to the input dtype.
- Kernel vs twin, elementwise: fp32, atol = rtol = 1e-5: both sum H <= 72 fp32 products
  (relative error ~H * 2**-24 ~ 4e-6). bf16: the twin rounds gate, up, silu(gate) and g
  (4 roundings of <= 2**-9 each); silu amplifies gate's relative error by at most
  |1 + a(1 - sigmoid(a))| <= 4 for the gates seen here (|a| < 5), so <= 7 * 2**-9 ~ 1.4%:
  rtol = 2**-6 = 1.6%, plus atol = 2**-6 * max|g| for products of near-cancelled sums.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vllm_coral.kernels.reference import feature_sampling_ref
from vllm_coral.models.fspad import FeatureSampler

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5

# (T, H, I, V): BLOCK_H = 64 and BLOCK_I = 64 (16 with many SMs), so H and I are ragged;
# T = 1, a non-power-of-two, and T = 70 > 64 (two token blocks).
SHAPES = [(1, 40, 50, 30), (5, 72, 150, 97), (70, 48, 40, 33)]
# (dtype, atol as a fraction of max|g|, rtol): see the module docstring.
TOLERANCES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2**-6, 2**-6)]


def _problem(T, H, I, V, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (T,), generator=gen)  # repeats included
    hidden = (3 * torch.randn(T, H, generator=gen)).to(dtype)  # RMSNorm must rescale it
    embedding = torch.randn(V, H, generator=gen).to(dtype)
    gate = (torch.randn(I, H, generator=gen) / H**0.5).to(dtype)
    up = (torch.randn(I, H, generator=gen) / H**0.5).to(dtype)
    norm = (1 + 0.2 * torch.randn(H, generator=gen)).to(dtype)
    return ids, hidden, embedding, gate, up, norm


def _step_by_step_fp64(ids, hidden, embedding, gate, up, norm, eps=EPS):
    """The maths written out, one named step per line, in fp64."""
    e = embedding.double()[ids]  # gather [T, H]
    h = hidden.double()
    rms = torch.sqrt((h * h).mean(dim=1, keepdim=True) + eps)  # [T, 1]
    normed = h / rms * norm.double()  # [T, H]
    a = e @ gate.double().T  # [T, I]
    silu = a * torch.sigmoid(a)
    return silu * (normed @ up.double().T)  # [T, I]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-5)])
def test_reference_matches_step_by_step(shape, dtype, tol):
    """fp32: summation-order noise only. bf16: the twin rounds e.g. the normalised h, gate,
    up, silu and g (<= 6 * 2**-9 relative, amplified up to 4x near silu's tail), so 2**-5
    of max|g|; the fp32 case checks the maths, the bf16 case the dtype plumbing."""
    args = _problem(*shape, dtype)
    got = feature_sampling_ref(*args, EPS)
    want = _step_by_step_fp64(*args)
    assert got.shape == want.shape == (shape[0], shape[2]) and got.dtype == dtype
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_model_sampler_bit_for_bit(dtype):
    """FeatureSampler(h, e) == h + down_proj(twin) exactly: the twin is the module's
    numerics, so the model (or the vLLM adapter) can call the fused op unchanged."""
    T, H, I, V = 6, 48, 80, 40
    torch.manual_seed(0)
    sampler = FeatureSampler(H, I, EPS)
    with torch.no_grad():
        sampler.norm.weight.mul_(1 + 0.2 * torch.randn(H))
    sampler = sampler.to(dtype)
    ids, hidden, embedding, *_ = _problem(T, H, I, V, dtype)
    with torch.no_grad():
        want = sampler(hidden, embedding[ids])
        g = feature_sampling_ref(ids, hidden, embedding, sampler.gate_proj.weight, sampler.up_proj.weight,
                                 sampler.norm.weight, sampler.norm.eps)  # fmt: skip
        got = hidden + sampler.down_proj(g)
    assert torch.equal(got, want)


def _bad_args():
    ids, hidden, embedding, gate, up, norm = _problem(3, 32, 40, 20, torch.float32)
    return dict(token_ids=ids, hidden=hidden, embedding=embedding, gate_weight=gate, up_weight=up,
                norm_weight=norm, eps=EPS)  # fmt: skip


BAD_INPUTS = [
    (lambda a: a.update(hidden=a["hidden"][None]), "expected token_ids"),
    (lambda a: a.update(token_ids=a["token_ids"][:2]), "2 token ids for 3 hidden rows"),
    (lambda a: a.update(embedding=torch.randn(20, 31)), "embedding hidden size 31"),
    (lambda a: a.update(up_weight=torch.randn(41, 32)), "expected gate_weight and up_weight"),
    (lambda a: a.update(norm_weight=torch.ones(31)), "norm_weight must be"),
    (lambda a: a.update(token_ids=a["token_ids"].float()), "must be int32 or int64"),
    (lambda a: a.update(gate_weight=a["gate_weight"].bfloat16()), "one floating dtype expected"),
    (lambda a: a.update(token_ids=torch.tensor([0, 20, 1])), "out of range"),
    (lambda a: a.update(token_ids=torch.tensor([0, -1, 1])), "out of range"),
    (lambda a: a.update(eps=-1.0), "eps must be >= 0"),
]


@pytest.mark.parametrize("mutate, message", BAD_INPUTS)
def test_reference_rejects_bad_inputs_in_one_line(mutate, message):
    args = _bad_args()
    mutate(args)
    with pytest.raises(ValueError, match=message) as exc:
        feature_sampling_ref(**args)
    assert "\n" not in str(exc.value)


def test_cpu_path_never_imports_triton():
    code = (
        "import sys, torch\n"
        "from vllm_coral.kernels.reference import feature_sampling_ref\n"
        "feature_sampling_ref(torch.tensor([1, 0]), torch.randn(2, 8), torch.randn(3, 8), torch.randn(5, 8),\n"
        "                     torch.randn(5, 8), torch.ones(8), 1e-6)\n"
        "sys.exit(1 if 'triton' in sys.modules else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- Triton kernel
triton_ok = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not triton_ok, reason="needs CUDA or TRITON_INTERPRET=1")


def _kernels():
    pytest.importorskip("triton")
    from vllm_coral.kernels import feature_sampling as mod

    return mod


def _run_kernel(mod, args, eps=EPS):
    return mod.feature_sampling(*(t.to(DEVICE) for t in args), eps).cpu()


def _check_against_twin_and_oracle(got, args, dtype, atol, rtol):
    ref = feature_sampling_ref(*args, EPS)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    exact = _step_by_step_fp64(*args)
    scale = exact.abs().max().item()
    torch.testing.assert_close(got, ref, atol=atol * scale, rtol=rtol)
    err_kernel = (got.double() - exact).abs().max().item()
    err_torch = (ref.double() - exact).abs().max().item()
    assert err_kernel <= 2 * err_torch + 1e-6 * scale, (err_kernel, err_torch)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_kernel_matches_reference(shape, dtype, atol, rtol):
    mod = _kernels()
    args = _problem(*shape, dtype, seed=1)
    _check_against_twin_and_oracle(_run_kernel(mod, args), args, dtype, atol, rtol)


@needs_triton
@pytest.mark.parametrize("dtype, atol, rtol", TOLERANCES)
def test_kernel_narrow_i_tiles_and_strided_inputs(monkeypatch, dtype, atol, rtol):
    """BLOCK_I = 16 (what a 132-SM GPU picks at SmolLM2's I), int32 ids, and an embedding
    table and hidden states whose rows are strided views of wider tensors."""
    mod = _kernels()
    real = mod.block_sizes
    monkeypatch.setattr(mod, "block_sizes", lambda t, h, i, sms: real(t, h, i, 132))
    assert mod.block_sizes(3, 40, 50, 1)["BLOCK_I"] == 16
    ids, hidden, embedding, gate, up, norm = _problem(3, 40, 50, 30, dtype, seed=2)
    wide_e = torch.cat((embedding, torch.full_like(embedding[:, :7], float("nan"))), dim=1)
    wide_h = torch.cat((hidden, torch.full_like(hidden[:, :5], float("nan"))), dim=1)
    args = (ids.int(), wide_h[:, :40], wide_e[:, :40], gate, up, norm)
    assert args[2].stride(0) == 47 and args[1].stride(0) == 45
    _check_against_twin_and_oracle(_run_kernel(mod, args), args, dtype, atol, rtol)


def test_block_sizes():
    mod = _kernels()
    # SmolLM2 on an H100 (132 SMs): 64- or 32-wide I tiles give 24 or 48 programs.
    assert mod.block_sizes(1, 576, 1536, 132) == dict(BLOCK_T=16, BLOCK_I=16, BLOCK_H=64, num_warps=4)
    assert mod.block_sizes(64, 576, 1536, 132) == dict(BLOCK_T=64, BLOCK_I=16, BLOCK_H=64, num_warps=8)
    # 8B: 224 programs of 64 columns cover the GPU; T = 64 is still one token block.
    assert mod.block_sizes(64, 4096, 14336, 132) == dict(BLOCK_T=64, BLOCK_I=64, BLOCK_H=32, num_warps=8)
    assert mod.block_sizes(4, 4096, 14336, 132) == dict(BLOCK_T=16, BLOCK_I=64, BLOCK_H=64, num_warps=8)
    assert mod.block_sizes(70, 40, 50, 1) == dict(BLOCK_T=64, BLOCK_I=64, BLOCK_H=32, num_warps=8)


_COMPILE_FOR_SM90 = """
import glob, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_coral.kernels import feature_sampling as mod

tool = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))
if not tool:
    sys.exit(77)
for dtype, T, H, I in [("bf16", 1, 576, 1536), ("bf16", 64, 576, 1536), ("bf16", 1, 4096, 14336),
                       ("bf16", 64, 4096, 14336), ("fp32", 16, 576, 1536)]:
    meta = mod.block_sizes(T, H, I, 132)
    warps = meta.pop("num_warps")
    ptrs = ["h_ptr", "emb_ptr", "wg_ptr", "wu_ptr", "wn_ptr", "out_ptr"]
    sig = {"ids_ptr": "*i64", **{p: "*" + dtype for p in ptrs}, "T": "i32", "H": "i32", "I": "i32",
           "eps": "fp32", **{s: "i32" for s in ["stride_ht", "stride_ev", "stride_gi", "stride_ui", "stride_ot"]}}
    consts = dict(meta, IEEE_FP32=dtype == "fp32", UPCAST=False, RNE_BF16=False)
    sig.update({name: "constexpr" for name in consts})
    kernel = triton.compile(ASTSource(mod._feature_sampling_kernel, sig, consts),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool[0], "-res-usage", f.name], capture_output=True, text=True).stdout
    print(dtype, T, H, I, [line for line in usage.splitlines() if "REG:" in line][0].strip())
"""


@pytest.mark.slow
def test_kernel_compiles_for_h100_without_register_spills():
    """The interpreter runs Python, not the GPU compiler: compile (no GPU needed) for
    sm_90 with the launcher's tiles at SmolLM2's and 8B's shape, and read the stack use
    (``STACK:n`` bytes of register spills)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True)
    if proc.returncode == 77:
        pytest.skip("this Triton wheel has no NVIDIA tools")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 5, proc.stdout
    # bf16, the serving dtype, must not spill; fp32 (IEEE dots, a test path) only compile.
    assert all("STACK:0 " in line for line in lines if line.startswith("bf16")), proc.stdout


@needs_triton
@pytest.mark.parametrize("mutate, message", BAD_INPUTS)
def test_kernel_rejects_bad_inputs_in_one_line(mutate, message):
    mod = _kernels()
    args = _bad_args()
    mutate(args)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=message) as exc:
        mod.feature_sampling(**args)
    assert "\n" not in str(exc.value)


@needs_triton
def test_kernel_empty_batch():
    mod = _kernels()
    ids, hidden, embedding, gate, up, norm = _problem(1, 32, 40, 20, torch.float32)
    out = mod.feature_sampling(ids[:0], hidden[:0], embedding, gate, up, norm, EPS)
    assert out.shape == (0, 40)


def test_dispatch_takes_the_twin_for_cpu_tensors():
    from vllm_coral.kernels.dispatch import feature_sampling

    g = torch.Generator().manual_seed(3)
    ids, h, E = torch.tensor([0, 5, 2]), torch.randn(3, 8, generator=g), torch.randn(7, 8, generator=g)
    wg, wu, nw = torch.randn(12, 8, generator=g), torch.randn(12, 8, generator=g), torch.rand(8, generator=g)
    torch.testing.assert_close(feature_sampling(ids, h, E, wg, wu, nw, 1e-5),
                               feature_sampling_ref(ids, h, E, wg, wu, nw, 1e-5), rtol=0, atol=0)  # fmt: skip

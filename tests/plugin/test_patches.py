"""The CPU patches: each test of the upstream behaviour asserts the problem is still
there, so it fails once vLLM fixes it, which is the signal to delete the patch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("vllm")

from vllm_coral.plugin import patches  # noqa: E402
from vllm_coral.plugin.cpu_defaults import planned_cpu_defaults  # noqa: E402


def test_targets_installed_vllm():
    import vllm

    assert vllm.__version__ == patches.TARGET_VLLM_VERSION


def test_upstream_cpu_expand_kernel_never_writes_float_output():
    """vllm/utils/cpu_triton_utils.py:_expand_kernel_impl writes into an int64 copy of a
    float output and never copies it back: the output keeps whatever it held."""
    from vllm.platforms import current_platform
    from vllm.utils.cpu_triton_utils import _expand_kernel_impl

    current_platform.import_kernels()  # loads the CPU ops library (torch.ops._C)
    temperature = torch.tensor([0.7, 1.3], dtype=torch.float32)
    cu_num_tokens = torch.tensor([2, 5], dtype=torch.int32)
    out = torch.full((5,), float("nan"))
    _expand_kernel_impl(out, temperature, cu_num_tokens, 0, 1)
    assert torch.isnan(out).all(), "upstream fixed the CPU expand kernel; drop the patch"

    # The same kernel is right for integers (top-k), which is why only floats break.
    top_k = torch.tensor([5, 7], dtype=torch.int64)
    out_int = torch.zeros(5, dtype=torch.int64)
    _expand_kernel_impl(out_int, top_k, cu_num_tokens, 0, 0)
    assert out_int.tolist() == [5, 5, 7, 7, 7]


@pytest.mark.parametrize(
    "x, cu, replace, expected",
    [
        # x=[a, b, c], cu=[2, 5, 6] -> [a, a, b, b, b, c]
        ([0.7, 1.3, 0.5], [2, 5, 6], (0, 0), [0.7, 0.7, 1.3, 1.3, 1.3, 0.5]),
        # greedy sentinel temperature 0 becomes 1 (vLLM divides logits by it)
        ([0.0, 0.8], [1, 3], (0, 1), [1.0, 0.8, 0.8]),
        # a request with no draft tokens contributes nothing
        ([0.9, 0.4, 2.0], [2, 2, 3], (0, 0), [0.9, 0.9, 2.0]),
    ],
)
def test_patched_expand_matches_definition(x, cu, replace, expected):
    got = patches.expand_batch_to_tokens(
        torch.tensor(x), torch.tensor(cu, dtype=torch.int32), len(expected), *replace
    )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected))


def test_patched_expand_keeps_integer_dtype():
    got = patches.expand_batch_to_tokens(
        torch.tensor([3, 9]), torch.tensor([1, 4], dtype=torch.int32), 4
    )
    assert got.dtype == torch.int64 and got.tolist() == [3, 9, 9, 9]


def _in_subprocess(code: str, **env: str) -> str:
    import os

    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_vllm_loads_the_plugin_and_patches_apply_once():
    """vLLM's own plugin loader finds our entry point; a second register() is a no-op."""
    code = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import vllm.v1.sample.rejection_sampler as rs
from vllm_coral.plugin import patches, register
first = patches.applied_patches()
register(); load_general_plugins()
assert patches.applied_patches() == first
print(rs.expand_batch_to_tokens is patches.expand_batch_to_tokens, ",".join(first))
"""
    out = _in_subprocess(code)
    assert out.startswith("True rejection_sampler_expand")


def test_patch_can_be_disabled():
    code = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import vllm.v1.sample.rejection_sampler as rs
from vllm_coral.plugin import patches
print(rs.expand_batch_to_tokens is patches.expand_batch_to_tokens)
"""
    assert _in_subprocess(code, VLLM_CORAL_DISABLE_PATCHES="rejection_sampler_expand") == "False"


AUTO_DTYPE = """
from vllm.plugins import load_general_plugins
load_general_plugins()
import torch
from vllm.config.model import _resolve_auto_dtype
print(_resolve_auto_dtype("llama", torch.float32, is_pooling_model=False))
"""


def test_upstream_auto_dtype_downcasts_fp32_checkpoints_on_cpu():
    assert _in_subprocess(AUTO_DTYPE, VLLM_CORAL_CPU_PREFER_FP32="0") == "torch.bfloat16"


def test_prefer_fp32_keeps_fp32_checkpoints_in_fp32():
    assert _in_subprocess(AUTO_DTYPE, VLLM_CORAL_CPU_PREFER_FP32="1") == "torch.float32"


@pytest.mark.parametrize(
    "flags, native",
    [
        ("fpu sse2 avx avx2 fma", False),
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 amx_bf16 amx_tile", True),
    ],
)
def test_native_bf16_detection(flags, native):
    cpuinfo = f"processor\t: 0\nflags\t\t: {flags}\nbugs\t\t: avx512_bf16_fake\n"
    assert patches.cpu_has_native_bf16(cpuinfo) is native


def test_cpu_defaults_respect_user_settings(tmp_path):
    lib = tmp_path / "libiomp5.so"
    plan = planned_cpu_defaults({}, 2, lib)
    assert plan == {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "NUMBA_THREADING_LAYER": "workqueue",
        "LD_PRELOAD": str(lib),
    }
    user = {"VLLM_CPU_KVCACHE_SPACE": "8", "LD_PRELOAD": "/x/libtcmalloc.so", "NUMBA_THREADING_LAYER": "omp"}
    plan = planned_cpu_defaults(user, 2, lib)
    assert "VLLM_CPU_KVCACHE_SPACE" not in plan and "NUMBA_THREADING_LAYER" not in plan
    assert plan["LD_PRELOAD"] == f"{lib}:/x/libtcmalloc.so"
    assert "LD_PRELOAD" not in planned_cpu_defaults({"LD_PRELOAD": "/y/libgomp.so"}, 2, lib)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in planned_cpu_defaults({}, 32, None)
    assert planned_cpu_defaults({"VLLM_CORAL_CPU_DEFAULTS": "0"}, 2, lib) == {}

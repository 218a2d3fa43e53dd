"""Every monkeypatch vllm-coral applies to vLLM, in one place.

Each patch names the vLLM version it was written against, why it exists, and has a test in
``tests/plugin/test_patches.py`` that shows the upstream behaviour it works around. Those
tests assert that the upstream problem is still there, so they fail once upstream fixes it:
that is the signal to delete the patch. On any other vLLM version the patches are not
applied and a warning says so.

Patches (vLLM 0.32.0, CPU platform only):

``rejection_sampler_expand``
    ``vllm.v1.sample.rejection_sampler.expand_batch_to_tokens`` expands per-request
    temperature / top-k / top-p to per-token values before verification. On CPU its
    kernel (``vllm/utils/cpu_triton_utils.py:_expand_kernel_impl``) casts both input and
    output to int64 temporaries and never copies the result back into the float output,
    so every speculative batch at T>0 is verified with uninitialised temperatures (and a
    0.7 temperature would have been truncated to 0 anyway). Replaced by a
    ``repeat_interleave`` over the per-request draft counts, e.g. x=[a, b, c],
    cu_num_tokens=[2, 5, 6] -> counts [2, 3, 1] -> [a, a, b, b, b, c].

``cpu_prefer_fp32``
    With ``dtype="auto"`` vLLM downcasts float32 checkpoints to bfloat16 on every CPU
    (``vllm/config/model.py:_resolve_auto_dtype`` takes ``supported_dtypes[0]``). On x86
    CPUs without native bf16 (no AVX512-BF16 / AMX-BF16, i.e. AVX2 laptops) bf16 matmuls
    are emulated and were measured 1.4-3.6x slower than fp32. On those CPUs only, this
    moves float32 to the front of ``CpuPlatform.supported_dtypes`` so "auto" keeps fp32.
    CPUs with native bf16 are left alone (bf16 measured faster there). ``--dtype`` always
    wins; ``VLLM_CORAL_CPU_PREFER_FP32=0|1`` forces the choice.

``seeded_chunked_prefill``
    A request whose prompt is split over several scheduler steps (chunked prefill) gets a
    token sampled at each partial step that vLLM then throws away, and for a seeded request
    (``SamplingParams(seed=...)``, per-request generators) it rewinds the generator by
    ``gen.set_offset(gen.get_offset() - 4)``
    (``GPUModelRunner._bookkeeping_sync``, also used by the CPU runner). That is CUDA's
    Philox offset; a CPU generator raises "CPU Generator does not use offset" and the
    engine dies, so on CPU any seeded T>0 request with a long prompt killed ``LLM`` and
    ``vllm serve``. Patched: the states of those requests' CPU generators are saved before
    sampling and put back after it, and the offset rewind skips them. A seeded request
    then draws the same tokens however its prompt was chunked.

``VLLM_CORAL_DISABLE_PATCHES=name[,name...]`` skips patches by name (to reproduce an
upstream bug, or once upstream has fixed it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "PATCHES",
    "TARGET_VLLM_VERSION",
    "apply_cpu_patches",
    "applied_patches",
    "cpu_has_native_bf16",
    "expand_batch_to_tokens",
    "original",
]

logger = logging.getLogger("vllm_coral")

# The vLLM release these patches were written and tested against.
TARGET_VLLM_VERSION = "0.32.0"

# name -> the upstream object each patch replaced, for tests and for unpatching.
_ORIGINALS: dict[str, object] = {}


def original(name: str) -> object:
    """The upstream object that patch ``name`` replaced (KeyError if not applied)."""
    return _ORIGINALS[name]


def applied_patches() -> list[str]:
    return sorted(_ORIGINALS)


def expand_batch_to_tokens(
    x: torch.Tensor,  # [batch_size]
    cu_num_tokens: torch.Tensor,  # [batch_size], cumulative token counts per request
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:  # [num_tokens]
    """Drop-in for vLLM's ``expand_batch_to_tokens`` that is correct for float inputs.

    x=[a, b, c], cu_num_tokens=[2, 5, 6] -> counts=[2, 3, 1] -> [a, a, b, b, b, c];
    entries equal to ``replace_from`` become ``replace_to`` (vLLM uses it to turn the
    greedy sentinel temperature into 1 before dividing logits by it).
    """
    counts = torch.diff(cu_num_tokens, prepend=cu_num_tokens.new_zeros(1))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(values, counts, output_size=num_tokens)


def _patch_rejection_sampler_expand() -> None:
    import vllm.v1.sample.rejection_sampler as rs

    _ORIGINALS["rejection_sampler_expand"] = rs.expand_batch_to_tokens
    # apply_sampling_constraints looks the name up in the module globals at call time.
    rs.expand_batch_to_tokens = expand_batch_to_tokens


def cpu_has_native_bf16(cpuinfo_text: str | None = None) -> bool:
    """True when the CPU executes bf16 matmuls natively (x86 AVX512-BF16 or AMX-BF16).

    Non-x86 CPUs are reported as native (we only change the default on x86 AVX2 parts).
    """
    if cpuinfo_text is None:
        import platform

        if platform.machine().lower() not in ("x86_64", "amd64"):
            return True
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo_text = f.read()
        except OSError:
            return True
    flags: set[str] = set()
    for line in cpuinfo_text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def _prefer_fp32_wanted() -> bool:
    forced = os.environ.get("VLLM_CORAL_CPU_PREFER_FP32")
    if forced is not None:
        return forced.strip() not in ("0", "false", "False", "")
    return not cpu_has_native_bf16()


def _patch_cpu_prefer_fp32() -> None:
    from vllm.platforms.cpu import CpuPlatform

    upstream = CpuPlatform.__dict__["supported_dtypes"]

    def supported_dtypes(self) -> list[torch.dtype]:
        dtypes = list(upstream.fget(self))
        if torch.float32 in dtypes:
            dtypes.remove(torch.float32)
            dtypes.insert(0, torch.float32)
        return dtypes

    _ORIGINALS["cpu_prefer_fp32"] = upstream
    CpuPlatform.supported_dtypes = property(supported_dtypes)


def _discarded_cpu_generators(runner) -> dict[int, torch.Generator]:
    """Batch index -> generator of the seeded requests whose token this step is thrown
    away (a partial prefill chunk), CPU generators only."""
    gens = runner.input_batch.generators
    if not gens:
        return {}
    mask = runner.discard_request_mask.np[: runner.input_batch.num_reqs]
    return {i: g for i, g in gens.items() if i < len(mask) and mask[i] and g.device.type == "cpu"}


def _patch_seeded_chunked_prefill() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample, bookkeeping = GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync
    _ORIGINALS["seeded_chunked_prefill"] = (sample, bookkeeping)

    def _sample(self, logits, spec_decode_metadata):
        saved = {i: g.get_state() for i, g in _discarded_cpu_generators(self).items()}
        out = sample(self, logits, spec_decode_metadata)
        for i, state in saved.items():
            self.input_batch.generators[i].set_state(state)
        return out

    def _bookkeeping_sync(self, *args, **kwargs):
        skip = _discarded_cpu_generators(self)
        if not skip:
            return bookkeeping(self, *args, **kwargs)
        gens = self.input_batch.generators
        self.input_batch.generators = {i: g for i, g in gens.items() if i not in skip}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            self.input_batch.generators = gens

    GPUModelRunner._sample = _sample
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync


@dataclass(frozen=True)
class Patch:
    # Stable name, also the key in ``original()``.
    name: str
    # Dotted path of what is replaced upstream.
    target: str
    # Returns whether the patch should be applied in this process.
    wanted: Callable[[], bool]
    # Applies it; only ever called once per process.
    apply: Callable[[], None]


PATCHES: tuple[Patch, ...] = (
    Patch(
        name="rejection_sampler_expand",
        target="vllm.v1.sample.rejection_sampler.expand_batch_to_tokens",
        wanted=lambda: True,
        apply=_patch_rejection_sampler_expand,
    ),
    Patch(
        name="cpu_prefer_fp32",
        target="vllm.platforms.cpu.CpuPlatform.supported_dtypes",
        wanted=_prefer_fp32_wanted,
        apply=_patch_cpu_prefer_fp32,
    ),
    Patch(
        name="seeded_chunked_prefill",
        target="vllm.v1.worker.gpu_model_runner.GPUModelRunner._sample / ._bookkeeping_sync",
        wanted=lambda: True,
        apply=_patch_seeded_chunked_prefill,
    ),
)


def apply_cpu_patches(vllm_version: str) -> list[str]:
    """Apply the CPU patches once per process; returns the names applied now."""
    if vllm_version.split("+")[0] != TARGET_VLLM_VERSION:
        logger.warning(
            "vllm-coral: CPU patches target vLLM %s, found %s; not applying %s",
            TARGET_VLLM_VERSION,
            vllm_version,
            ", ".join(p.name for p in PATCHES),
        )
        return []
    disabled = {n.strip() for n in os.environ.get("VLLM_CORAL_DISABLE_PATCHES", "").split(",")}
    applied = []
    for patch in PATCHES:
        if patch.name in _ORIGINALS or patch.name in disabled or not patch.wanted():
            continue
        patch.apply()
        applied.append(patch.name)
    return applied

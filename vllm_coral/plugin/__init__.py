"""vLLM integration: the ``vllm.general_plugins`` entry point and everything that imports vLLM.

vLLM calls ``register()`` in every process it starts (frontend, engine core, workers, the
model-registry inspection subprocess), so it must be cheap and idempotent. It

1. on the CPU platform, sets laptop-friendly environment defaults (``cpu_defaults``) and
   applies the version-pinned CPU fixes (``patches``);
2. leaves a timer for the phases of each engine step in vLLM's profiler hook
   (``phases``: only engines that ``open_llm`` gives a phase file are timed);
3. registers the drafter architectures of every family in the drafter-family registry
   (``vllm_coral.models.registry``: ``ServeSpec.vllm_class``) with ``ModelRegistry`` by
   ``"module:Class"`` string, so no model code is imported until vLLM needs it.

Importing this package does not import vLLM; ``register()`` does.
"""

from __future__ import annotations

import logging

__all__ = ["model_architectures", "register"]

logger = logging.getLogger("vllm_coral")

# Not drafter families: the recording EAGLE drafters the fidelity tests serve.
_TEST_ARCHITECTURES = {
    "EagleRecorderLlamaForCausalLM": "vllm_coral.plugin.recorder:EagleRecorderLlamaForCausalLM",
    "Eagle3RecorderLlamaForCausalLM": "vllm_coral.plugin.recorder:Eagle3RecorderLlamaForCausalLM",
}


def model_architectures() -> dict[str, str]:
    """Architecture name in a checkpoint's config.json -> "module:Class" of its vLLM model."""
    from vllm_coral.models.registry import families

    archs = {f.serve.architecture: f.serve.vllm_class for f in families().values() if f.serve.vllm_class}
    return {**archs, **_TEST_ARCHITECTURES}

_registered = False


def register() -> None:
    """Entry point for ``vllm.general_plugins``; safe to call any number of times."""
    global _registered
    if _registered:
        return

    from vllm import ModelRegistry, __version__ as vllm_version
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm_coral.plugin.cpu_defaults import apply_cpu_defaults
        from vllm_coral.plugin.patches import apply_cpu_patches

        env_set = apply_cpu_defaults()
        patched = apply_cpu_patches(vllm_version)
        if env_set or patched:
            logger.info("vllm-coral: CPU defaults %s; patches %s", env_set, patched)

    from vllm_coral.plugin.phases import install as install_phase_timer

    install_phase_timer()
    supported = set(ModelRegistry.get_supported_archs())
    for arch, qualname in model_architectures().items():
        if arch not in supported:
            ModelRegistry.register_model(arch, qualname)
    _registered = True

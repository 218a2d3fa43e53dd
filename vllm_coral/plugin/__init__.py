"""vLLM integration: the ``vllm.general_plugins`` entry point and everything that imports vLLM.

vLLM calls ``register()`` in every process it starts (frontend, engine core, workers, the
model-registry inspection subprocess), so it must be cheap and idempotent. It

1. on the CPU platform, sets laptop-friendly environment defaults (``cpu_defaults``) and
   applies the version-pinned CPU fixes (``patches``);
2. registers vllm-coral's drafter architectures with ``ModelRegistry`` by
   ``"module:Class"`` string, so no model code is imported until vLLM needs it.

Importing this package does not import vLLM; ``register()`` does.
"""

from __future__ import annotations

import logging

__all__ = ["MODEL_ARCHITECTURES", "register"]

logger = logging.getLogger("vllm_coral")

# architecture name in a checkpoint's config.json -> "module:Class" of its vLLM model.
# Drafter families add themselves here as they land.
MODEL_ARCHITECTURES: dict[str, str] = {
    "EagleCoralLlamaForCausalLM": "vllm_coral.plugin.coral:EagleCoralLlamaForCausalLM",
    "EagleRecorderLlamaForCausalLM": "vllm_coral.plugin.recorder:EagleRecorderLlamaForCausalLM",
}

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

    supported = set(ModelRegistry.get_supported_archs())
    for arch, qualname in MODEL_ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, qualname)
    _registered = True

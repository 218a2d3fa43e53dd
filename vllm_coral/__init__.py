"""vllm-coral: train and serve speculative-decoding drafters for vLLM.

Subpackages import downward only (checked by tests/test_layering.py):
``kernels`` <- ``models`` <- {``training``, ``plugin``}. Only ``plugin`` imports vLLM, so
importing the training code never starts vLLM and importing the plugin never
initialises CUDA.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

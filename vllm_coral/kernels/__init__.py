"""Compute kernels: Triton on CUDA, plain-torch twins (``reference.py``) everywhere else.

Nothing here imports vLLM, and the CPU path never imports Triton.
"""

"""Drafter training: feature extraction, streamed feature datasets, the one training loop
(``loop``) and the recipes it runs (``unrolled``: EAGLE/HASS/CORAL, ``router``: CORAL's
LM-head router), found through the drafter-family registry (``recipes``).

Importing this package must not import vLLM (tests/test_layering.py checks it); data
generation through vLLM lives in ``vllm_coral.workflows.generate``.
"""

"""Drafter training: feature extraction, streamed feature datasets, the one training loop
(``loop``) and the recipes it runs (``unrolled``: EAGLE/HASS/CORAL, ``router``: CORAL's
LM-head router), found through the drafter-family registry (``recipes``).

Importing this package must not import vLLM (tests/test_layering.py checks it); data
generation through vLLM lives in ``vllm_coral.workflows.generate``.

Importing it caps oneDNN's primitive cache (``ONEDNN_CACHE``; a value already in the
environment wins): oneDNN, which runs torch's bf16 matmuls on the CPU, keeps a primitive
and its scratch memory per shape, 1,024 by default, and training and feature extraction
bring new shapes with every batch, so the process grew by gigabytes (see ``loop``). oneDNN
reads the setting once, when it makes its first primitive.
"""

import os

ONEDNN_CACHE = 64  # the primitives one training step reuses (forward, backward, unrolled steps)
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE))

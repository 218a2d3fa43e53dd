"""Drafter training: data generation, feature extraction and trainers.

Importing this package must not import vLLM (tests/test_layering.py checks it); the
data-generation step that runs the target through vLLM imports it lazily.
"""

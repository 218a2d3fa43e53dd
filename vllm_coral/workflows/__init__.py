"""End-to-end jobs that combine the training code with vLLM (data generation, ...).

This layer sits above ``plugin`` and ``training``, which stay independent of each other.
"""

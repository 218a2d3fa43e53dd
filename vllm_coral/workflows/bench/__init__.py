"""Benchmarks of speculative decoding through real vLLM: ``vllm-coral bench``.

- :mod:`.methods`: the method rows (JSON), validated before any engine starts;
- :mod:`.questions`: MT-bench-format questions, GSM8K/HumanEval writers;
- :mod:`.offline`: ``bench offline``, one ``vllm.LLM`` per method;
- :mod:`.server` and :mod:`.serve`: ``bench serve``, one ``vllm serve`` per method under load;
- :mod:`.guard`: T=0 outputs token by token against the target alone;
- :mod:`.report`: run metadata, JSON, markdown tables (merging runs) and plots.
"""

"""Loading a broken drafter checkpoint into a real engine must fail, with the cause in the logs.

The engine is started in a child process, so that its failure ends that process only; the
root cause is raised in vLLM's worker and shows up in the logs the child prints.
"""

from __future__ import annotations

import subprocess
import sys

__all__ = ["engine_start_failure_logs"]


def engine_start_failure_logs(target_path, spec: dict) -> str:
    """Start the target with `spec` as speculative_config in a child; assert it fails; -> its logs."""
    code = f"""
from vllm_coral.plugin.engine import engine_kwargs, open_llm
if __name__ == "__main__":
    with open_llm(**engine_kwargs({str(target_path)!r}, dtype="float32", speculative_config={spec!r})):
        pass
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, "the engine started with a broken drafter checkpoint"
    return proc.stdout + proc.stderr  # vLLM logs the worker's root cause

"""Start ``vllm serve`` for a benchmark, wait until it is healthy, and always stop it.

The server runs in its own session (process group), bound to 127.0.0.1 on a free port,
with its output in a log file. :func:`served` yields the base URL once ``/health``
answers 200, and on exit (normal, error or Ctrl-C) sends SIGTERM to the whole group (the
API server, the engine core and its workers), waits, escalates to SIGKILL, and checks
that no process of the group is left.

A server that exits during start-up, or is not healthy in time, raises
:class:`ServerError` with one line: the exit status and the log's last error line, plus
the log's path for the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from vllm_coral.workflows.bench.methods import BenchError

__all__ = ["ServerError", "group_alive", "one_line", "served", "serve_command", "stop_group"]


class ServerError(BenchError):
    """``vllm serve`` did not start (or did not stop) as expected."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str | Path, port: int, *, speculative_config: dict | None = None, dtype: str = "float32",
                  max_model_len: int = 2048, seed: int = 0, extra: list[str] | None = None) -> list[str]:  # fmt: skip
    """The ``vllm serve`` command line (the venv's ``vllm`` next to this interpreter)."""
    vllm = Path(sys.executable).parent / "vllm"
    cmd = [
        str(vllm) if vllm.exists() else "vllm", "serve", str(model),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(max_model_len), "--enforce-eager", "--seed", str(seed),
    ]  # fmt: skip
    if speculative_config is not None:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    return cmd + list(extra or [])


@contextlib.contextmanager
def served(
    model: str | Path,
    log_path: Path,
    *,
    speculative_config: dict | None = None,
    dtype: str = "float32",
    seed: int = 0,
    startup_timeout: float = 300.0,
    extra: list[str] | None = None,
    command: list[str] | None = None,
    on_start=None,
) -> Iterator[str]:
    """Run ``vllm serve`` for the duration of the block; yields ``http://127.0.0.1:PORT``.

    ``command`` replaces the ``vllm serve`` command line (``{port}`` in it is replaced by
    the chosen port), e.g. to wrap it; ``on_start(pid)`` is called as soon as the process
    exists (tests use both to check the lifecycle).
    """
    import requests

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if command is not None:
        cmd = [part.replace("{port}", str(port)) for part in command]
    else:
        cmd = serve_command(model, port, speculative_config=speculative_config, dtype=dtype, seed=seed, extra=extra)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if on_start is not None:
            on_start(proc.pid)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                code = proc.poll()
                if code is not None:
                    raise ServerError(f"vllm serve exited with status {code} during start-up: "
                                      f"{last_error_line(log_path)} (log: {log_path})")  # fmt: skip
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{base}/health", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise ServerError(f"vllm serve not healthy after {startup_timeout:.0f} s (log: {log_path})")
                time.sleep(1.0)
            yield base
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left; raises if anything survives."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + timeout
    while group_alive(proc.pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(1.0)
            if group_alive(proc.pid):
                raise ServerError(f"processes of vllm serve (group {proc.pid}) survived SIGKILL")
            break
        time.sleep(0.5)


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still exists (zombies of other parents included)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_ERROR = re.compile(r"(Error|Exception|error:)")
# vLLM's log prefix: "(EngineCore pid=12) ERROR 11-23 17:42:29 [core.py:9] ".
_PREFIX = re.compile(r"^(\([^)]*pid=\d+\)\s*)?((DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d [\d:]+ \[[^\]]*\]\s*)?")


def last_error_line(log_path: Path) -> str:
    """The log's last line naming an error (else its last line), without vLLM's prefix.

    For a pydantic validation error, the field and the reason (printed on the next two
    lines) are added after "; ".
    """
    try:
        raw = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    lines = [ln for ln in raw if ln.strip()]
    if not lines:
        return "(empty log)"
    hits = [i for i, ln in enumerate(lines) if _ERROR.search(ln) and not ln.startswith(("Traceback", " "))]
    i = hits[-1] if hits else len(lines) - 1
    line = _PREFIX.sub("", lines[i].strip())
    if "validation error" in line:
        # pydantic: "<field>" then "  <reason> [type=...]" on the next lines.
        detail = [ln.strip().split(" [type=")[0] for ln in lines[i + 1 : i + 3] if "errors.pydantic.dev" not in ln]
        line += "; " + ": ".join(detail)
    return line[:300]


def one_line(e: BaseException) -> str:
    """The exception's last meaningful line (vLLM wraps worker errors in long chains)."""
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        lines = [ln.strip() for ln in traceback.format_exception_only(type(e), e) if ln.strip()]
    line = lines[-1] if len(lines) > 1 else lines[0]
    return line if len(line) <= 300 else line[:297] + "..."

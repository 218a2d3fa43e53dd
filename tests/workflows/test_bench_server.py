"""Server lifecycle with stand-in servers (fast); tests/vllm/test_bench_cli.py runs the real one.

The stand-in is a Python HTTP server that answers ``/health`` after a delay and, like
``vllm serve``, has a child process (its "engine core"). Checked: the block is entered
only once healthy, the whole process group is stopped on exit, also when the block
raises, and a server that dies during start-up is one line naming the log's error.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest
import requests

from vllm_coral.workflows.bench.server import ServerError, group_alive, last_error_line, served

FAKE = textwrap.dedent(
    """
    import http.server, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(float(sys.argv[2]))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)
DYING = 'import sys; print("INFO starting"); print("ValueError: num_speculative_tokens must be > 0", flush=True); sys.exit(3)'


def _fake(tmp_path, delay=1.0):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    return [sys.executable, str(script), "{port}", str(delay)]


def test_started_healthy_stopped_nothing_left(tmp_path):
    pids = []
    with served("m", tmp_path / "s.log", command=_fake(tmp_path), on_start=pids.append) as base:
        assert requests.get(f"{base}/health", timeout=5).status_code == 200  # only entered once healthy
        assert base.startswith("http://127.0.0.1:")
        assert group_alive(pids[0])
    assert not group_alive(pids[0])  # server and its child both gone


def test_stopped_when_the_block_raises(tmp_path):
    pids = []
    with pytest.raises(KeyError):
        with served("m", tmp_path / "s.log", command=_fake(tmp_path, delay=0.0), on_start=pids.append):
            raise KeyError("benchmark failed mid-run")
    assert not group_alive(pids[0])


def test_server_dying_at_start_is_one_line(tmp_path):
    pids = []
    with pytest.raises(ServerError) as info:
        with served("m", tmp_path / "s.log", command=[sys.executable, "-c", DYING], on_start=pids.append):
            pytest.fail("must not be entered")
    message = str(info.value)
    assert "\n" not in message
    assert "exited with status 3 during start-up: ValueError: num_speculative_tokens must be > 0" in message
    assert not group_alive(pids[0])


def test_not_healthy_in_time(tmp_path):
    pids = []
    with pytest.raises(ServerError, match="not healthy after 2 s"):
        with served("m", tmp_path / "s.log", command=_fake(tmp_path, delay=60), startup_timeout=2, on_start=pids.append):
            pass
    assert not group_alive(pids[0])


def test_last_error_line_strips_vllm_log_prefixes(tmp_path):
    log = tmp_path / "x.log"
    log.write_text(
        "(APIServer pid=1) INFO 11-23 17:42:28 [api_server.py:1] starting\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1\n'
        "(APIServer pid=1) ERROR 11-23 17:42:29 [core.py:9] EngineCore failed to start.\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for SpeculativeConfig\n"
        "prompt_lookup_max\n"
        "  Input should be greater than or equal to 1 [type=greater_than_equal, input_value=-3, input_type=int]\n"
        "    For further information visit https://errors.pydantic.dev/2.14/v/greater_than_equal\n"
    )
    assert last_error_line(log) == ("pydantic_core._pydantic_core.ValidationError: 1 validation error for "
                                    "SpeculativeConfig; prompt_lookup_max: Input should be greater than or equal to 1")
    assert last_error_line(tmp_path / "missing.log") == "(no log)"
    assert os.path.exists(log)

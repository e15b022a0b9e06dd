"""An engine that dies is reported as dead, with the signal and its likely cause: at start (ftq serve
exits naming it instead of waiting for health) and while serving (the request fails naming it)."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

from conftest import REPO, start_server, stop


@pytest.fixture(scope="module")
def embedded():
    from ftq.stages.base import embedded_gguf

    return embedded_gguf()


def test_ftq_serve_names_an_engine_that_dies_by_sigill_at_start(tmp_path, embedded):
    dying = tmp_path / "llama-server"
    dying.write_text("#!/bin/sh\nkill -ILL $$\n")
    dying.chmod(dying.stat().st_mode | stat.S_IEXEC)
    result = subprocess.run([sys.executable, "-m", "ftq", "serve", "--model", str(embedded), "--threads", "1"],
                            cwd=REPO, env={**__import__("os").environ, "FTQ_LLAMA_SERVER": str(dying)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "llama-server did not start" in result.stderr and "died by SIGILL (an instruction this CPU" in result.stderr


@pytest.mark.slow
def test_a_request_to_an_engine_that_died_says_so_and_health_turns_503(embedded):
    process, port, health = start_server(str(embedded))
    try:
        [engine] = [p for p in psutil.Process(process.pid).children(recursive=True) if "llama-server" in p.name()]
        engine.send_signal(signal.SIGILL)
        deadline = time.monotonic() + 30
        while engine.is_running() and engine.status() != psutil.STATUS_ZOMBIE:  # dead, not yet reaped by ftq
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = json.dumps({"model": health["model"], "messages": [{"role": "user", "content": "Hi"}],
                           "max_tokens": 4}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(request, timeout=60)
        message = json.loads(failed.value.read())["error"]["message"]
        assert failed.value.code == 500 and "died by SIGILL" in message, message
        with pytest.raises(urllib.error.HTTPError) as unhealthy:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
        assert unhealthy.value.code == 503
    finally:
        stop(process)

"""The llama-server engine is reachable by the gateway alone: it listens on a Unix socket in a folder only
this user can enter (no TCP port another process could find), and it refuses any request without its random
key, which reaches it through its environment, never its command line (readable by every local user)."""

from __future__ import annotations

import asyncio
import json
import stat

import psutil
import pytest

from ftq.engines.llama_server import LlamaServerEngine, UnixConnection


@pytest.fixture(scope="module")
def engine():
    from ftq.stages.base import embedded_gguf

    started = LlamaServerEngine(embedded_gguf(), threads=1, n_ctx=256, parallel=1)
    yield started
    started.close()


def call(engine, method: str, route: str, body: dict | None = None, key: str | None = None) -> tuple[int, bytes]:
    connection = UnixConnection(engine.socket, timeout=60)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        connection.request(method, route, body=json.dumps(body) if body is not None else None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_engine_refuses_a_request_without_its_key(engine):
    prompt = {"prompt": "Hi", "n_predict": 1}
    for method, route, body in (("GET", "/props", None), ("GET", "/slots", None), ("POST", "/completion", prompt)):
        assert call(engine, method, route, body)[0] == 401, route
        assert call(engine, method, route, body, key="guessed")[0] == 401, route
    status, answer = call(engine, "POST", "/completion", prompt, key=engine.key)
    assert status == 200 and "content" in json.loads(answer)
    assert asyncio.run(gateway_tokenize(engine))  # the gateway's own session carries the key


async def gateway_tokenize(engine) -> list[int]:
    try:
        return await engine.tokenize("Hello", False)
    finally:
        await engine.session.close()
        engine._session = None


def test_the_engine_listens_on_a_private_socket_and_no_port(engine):
    process = psutil.Process(engine.process.pid)
    assert [c for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN] == []
    assert stat.S_ISSOCK((engine.folder / "engine.sock").stat().st_mode)
    assert stat.S_IMODE(engine.folder.stat().st_mode) == 0o700  # other users cannot reach the socket


def test_the_engines_key_is_in_its_environment_not_on_its_command_line(engine):
    process = psutil.Process(engine.process.pid)
    assert engine.key not in " ".join(process.cmdline()) and "--api-key" not in process.cmdline()
    assert process.environ()["LLAMA_API_KEY"] == engine.key
    assert len(engine.key) >= 32


def test_engine_errors_do_not_name_its_socket_or_key(engine):
    text = engine.redact(f"listening on unix://{engine.socket} with Bearer {engine.key}")
    assert engine.socket not in text and engine.key not in text and "<engine socket>" in text

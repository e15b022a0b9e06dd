"""A real `ftq serve` (gateway + llama-server engine) against what a hostile web page, a local user or an odd
client sends: foreign Origins and rebound Host names, bodies that are not JSON, seeds and nesting that
used to be 500s, clients that leave before the first chunk, the key on the command line, /openapi.json."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO, start_server, stop

KEY = "key-from-a-file"
HI = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tiny_model_dir):
    from ftq.quantize import gguf

    out = tmp_path_factory.mktemp("gguf")
    gguf.build(tiny_model_dir, out, gguf.validate({"type": "q8_0"}, "test"))
    return out / "model.gguf"


@pytest.fixture(scope="module")
def server(gguf_model, tmp_path_factory):
    """One slot and one place in the queue: a place that leaks shows at once."""
    key = tmp_path_factory.mktemp("key") / "key"
    key.write_text(KEY + "\n")
    key.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "FTQ_API_KEY"}
    process, port, _ = start_server(str(gguf_model), "--api-key-file", str(key), "--parallel", "1",
                                    "--max-queued", "1", "--max-tokens-limit", "64", env=env, inherit_env=False)
    yield port
    stop(process)


def call(port, path, body=None, headers=None, key=KEY):
    """(status, headers, body) of one request; `body` a dict (sent as JSON) or bytes."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=sent,
                                     method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_the_key_comes_from_a_file(server):
    assert call(server, "/v1/chat/completions", HI)[0] == 200
    assert call(server, "/v1/chat/completions", HI, key=None)[0] == 401
    assert call(server, "/v1/chat/completions", HI, key="guess")[0] == 401


def test_openapi_json_needs_the_key(server):
    assert call(server, "/openapi.json", key=None)[0] == 401
    status, _, body = call(server, "/openapi.json")
    assert status == 200 and "/v1/chat/completions" in json.loads(body)["paths"]
    assert call(server, "/docs", key=None)[0] == 404


def test_a_foreign_web_page_cannot_call_the_server(server):
    """What any page the user opens could send: a text/plain POST needs no CORS preflight, and DNS
    rebinding makes the page's own name point here."""
    status, _, body = call(server, "/v1/chat/completions", json.dumps(HI).encode(), {"Content-Type": "text/plain"})
    assert status == 415 and b"application/json" in body
    assert call(server, "/v1/chat/completions", json.dumps(HI).encode(), {"Content-Type": ""})[0] == 415
    status, _, body = call(server, "/v1/chat/completions", HI, {"Origin": "http://attacker.example"})
    assert status == 403 and b"--allowed-origin" in body
    assert call(server, "/health", headers={"Origin": "http://attacker.example"})[0] == 403
    status, _, body = call(server, "/v1/models", headers={"Host": f"attacker.example:{server}"})
    assert status == 400 and b"--allowed-host" in body
    # the chat page this server serves calls its own API: same origin
    assert call(server, "/v1/chat/completions", HI, {"Origin": f"http://127.0.0.1:{server}"})[0] == 200
    assert call(server, "/v1/chat/completions", HI, {"Host": f"localhost:{server}"})[0] == 200


def test_huge_seeds_deep_nesting_and_bad_token_ids_are_400s_not_500s(server):
    for seed in (2 ** 64, 2 ** 70, -2 ** 64):
        status, _, body = call(server, "/v1/chat/completions", {**HI, "seed": seed})
        assert status == 400 and b"seed" in body, (seed, body)
    assert call(server, "/v1/chat/completions", {**HI, "seed": 2 ** 40})[0] == 200  # within 64 bits: served
    deep = b'{"messages": [{"role": "user", "content": "x"}], "stream_options": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    assert call(server, "/v1/chat/completions", deep)[0] == 400
    nested = {"type": "object"}
    for _ in range(60):
        nested = {"type": "object", "properties": {"x": nested}}
    tool = {"type": "function", "function": {"name": "f", "parameters": nested}}
    status, _, body = call(server, "/v1/chat/completions", {**HI, "tools": [tool]})
    assert status == 400 and b"nested deeper" in body
    assert call(server, "/detokenize", {"tokens": [2 ** 64]})[0] == 400
    assert call(server, "/v1/completions", {"prompt": [[1, 2 ** 40]], "max_tokens": 1, "echo": True})[0] == 400


def send_and_leave(port: int, body: dict) -> None:
    """A streaming request whose client closes the connection as soon as it is sent, before any answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    sock.close()


def test_a_client_that_leaves_before_the_first_chunk_frees_its_place_at_once(server):
    """End to end, through uvicorn. Its ASGI 2.3 `send` returns quietly for a client that has gone, so the
    stream's generator still starts here; `test_guard.py` covers the ASGI 2.4 path, where it never does."""
    # a long prompt: the gateway is still counting it when the client has gone
    body = {"messages": [{"role": "user", "content": "word " * 1500}], "max_tokens": 8, "stream": True}
    for _ in range(10):
        send_and_leave(server, body)
    deadline = time.monotonic() + 5
    while True:
        health = json.loads(call(server, "/health")[2])
        if (health["active"], health["queued"]) == (0, 0):
            break
        assert time.monotonic() < deadline, f"places still taken 5 s after the clients left: {health}"
        time.sleep(0.1)
    # one slot and one place in the queue: a leaked place would turn these into 503s
    for _ in range(3):
        assert call(server, "/v1/chat/completions", {**HI, "stream": True})[0] == 200


def test_the_key_on_the_command_line_is_warned_about(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ftq", "serve", "--model", str(tmp_path / "absent.gguf"),
                             "--api-key", "visible"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--api-key on the command line is visible to every user" in result.stderr
    assert "FTQ_API_KEY" in result.stderr and "--api-key-file" in result.stderr


def test_a_stream_error_names_no_internals():
    from ftq.engines import EngineError
    from ftq.serve.app import stream_error

    assert stream_error(EngineError("llama-server died by SIGKILL"))["message"] == "llama-server died by SIGKILL"
    assert "/tmp" not in stream_error(OSError("connect to /tmp/ftq-engine-x/engine.sock refused"))["message"]

"""Soak: 64 concurrent streaming clients against a real `ftq serve` for a bounded time, a third of them
leaving at random points (some before the first chunk, some before the headers), mixed with malformed and
oversized requests, seeds beyond 64 bits, deep nesting, wrong content types and foreign Origin or Host
headers. The server must answer every well-formed request, refuse the rest with a 4xx, return no server
errors, end idle, and not grow."""

import asyncio
import json
import random
import time

import pytest

from conftest import start_server, stop
from test_holds import rss

CLIENTS = 64
SECONDS = 40


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, tiny_model_dir):
    from ftq.quantize import gguf

    out = tmp_path_factory.mktemp("gguf")
    gguf.build(tiny_model_dir, out, gguf.validate({"type": "q8_0"}, "test"))
    return out / "model.gguf"


async def drive(port: int, seconds: float, seed: int) -> dict:
    import httpx

    rng = random.Random(seed)
    tally = {"well_formed": 0, "answered": 0, "left": 0, "malformed": 0, "refused": 0, "server_errors": []}
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits) as client:
        async def one_client(index: int) -> None:
            while time.monotonic() < deadline:
                roll = rng.random()
                if roll < 0.33:
                    await leave_early(client, rng, tally)
                elif roll < 0.43:
                    await malformed(client, rng, tally)
                else:
                    await well_formed(client, rng, tally, index)

        await asyncio.gather(*(one_client(i) for i in range(CLIENTS)))
    return tally


def chat(rng, stream=True) -> dict:
    return {"messages": [{"role": "user", "content": rng.choice(["Hi", "Tell me a story", "What is 2+2?"])}],
            "max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.8]), "stream": stream,
            "seed": rng.randint(0, 1000)}


async def well_formed(client, rng, tally, index) -> None:
    tally["well_formed"] += 1
    body = chat(rng, stream=index % 4 != 0)  # a quarter of the clients wait for whole answers
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        text = (await response.aread()).decode()
    if response.status_code >= 500:
        tally["server_errors"].append((response.status_code, text[:200]))
    elif response.status_code == 200 and (not body["stream"] or text.rstrip().endswith("data: [DONE]")):
        tally["answered"] += 1


async def leave_early(client, rng, tally) -> None:
    tally["left"] += 1
    if rng.random() < 0.3:
        return await leave_before_headers(client.base_url.port, rng)
    chunks = rng.randint(0, 6)
    async with client.stream("POST", "/v1/chat/completions", json={**chat(rng), "max_tokens": 200}) as response:
        if response.status_code >= 500:
            tally["server_errors"].append((response.status_code, ""))
            return
        seen = 0
        async for _ in response.aiter_lines():
            seen += 1
            if seen >= chunks:
                break  # leaving the block closes the connection mid-answer


async def leave_before_headers(port: int, rng) -> None:
    """A streaming request whose client closes the connection as soon as it is sent."""
    body = json.dumps(chat(rng)).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


HI = [{"role": "user", "content": "x"}]
# what each kind of bad request is sent as (body, extra headers), and the status it must get
MALFORMED = {
    "json": (b"{not json", {}, 400),
    "field": (json.dumps({"messages": [], "bogus": 1}).encode(), {}, 400),
    "range": (json.dumps({"messages": HI, "temperature": 9}).encode(), {}, 400),
    "big": (b'{"messages": [{"role": "user", "content": "' + b"x" * 1_500_000 + b'"}]}', {}, 413),
    "seed": (json.dumps({"messages": HI, "seed": 2 ** 70}).encode(), {}, 400),
    "deep": (b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", {}, 400),
    "nested": (json.dumps({"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters":
        json.loads('{"a": ' * 100 + "1" + "}" * 100)}}]}).encode(), {}, 400),
    "text/plain": (json.dumps({"messages": HI}).encode(), {"Content-Type": "text/plain"}, 415),
    "form": (b"messages=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    "origin": (json.dumps({"messages": HI}).encode(), {"Origin": "http://attacker.example"}, 403),
    "host": (json.dumps({"messages": HI}).encode(), {"Host": "attacker.example"}, 400),
}


async def malformed(client, rng, tally) -> None:
    tally["malformed"] += 1
    kind = rng.choice(sorted(MALFORMED))
    body, headers, expected = MALFORMED[kind]
    try:
        response = await client.post("/v1/chat/completions", content=body,
                                     headers={"Content-Type": "application/json", **headers})
    except httpx_errors() as exc:
        if kind != "big":  # a small malformed body must get its 400, never a dropped connection
            tally["server_errors"].append(("dropped", f"{kind}: {type(exc).__name__}: {exc}"))
        return  # a 413 may close the connection while the big body is still being sent
    if response.status_code >= 500:
        tally["server_errors"].append((response.status_code, response.text[:200]))
    elif response.status_code == expected:
        tally["refused"] += 1
    else:
        tally["server_errors"].append((response.status_code, f"{kind}: expected {expected}"))


def httpx_errors():
    import httpx

    return (httpx.WriteError, httpx.ReadError, httpx.RemoteProtocolError)


def test_64_clients_leaving_and_misbehaving_leave_the_server_whole(gguf_model):
    import urllib.request

    process, port, _ = start_server(str(gguf_model), "--parallel", "4", "--max-queued", str(CLIENTS),
                                    "--max-tokens-limit", "256", "--max-body-bytes", "1000000")
    try:
        asyncio.run(drive(port, 5, seed=1))  # warm: first requests allocate buffers once
        memory_before = rss(process.pid)
        tally = asyncio.run(drive(port, SECONDS, seed=2))
        time.sleep(2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            health = json.loads(response.read())
        memory_after = rss(process.pid)
    finally:
        stop(process)
    print(f"soak: {tally['well_formed']} well-formed, {tally['left']} left early, {tally['malformed']} malformed; "
          f"memory {memory_before / 1e6:.0f} -> {memory_after / 1e6:.0f} MB")
    assert tally["server_errors"] == []
    assert tally["well_formed"] > CLIENTS and tally["left"] > CLIENTS / 2 and tally["malformed"] > 10
    assert tally["answered"] == tally["well_formed"]
    assert tally["refused"] > 0
    assert (health["active"], health["queued"]) == (0, 0)
    assert memory_after <= 1.10 * memory_before

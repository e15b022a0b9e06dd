"""The gateway's policies as pure functions, without a server (milliseconds): which Host, Origin and
Content-Type a request may carry, where the API key comes from, which parsed tool calls are returned, and
the swap's door (requests are refused while the old model drains)."""

import asyncio
import threading
import time

import pytest

from ftq.errors import UsageError
from ftq.serve.guard import Policy, host_name, refusal
from ftq.serve.server import API_KEY_ENV, api_key_of
from ftq.serve.swap import Occupancy
from ftq.serve.tool_calls import Calling, StreamHold, message

LOOPBACK = Policy.for_bind("127.0.0.1")
JSON = {"content-type": "application/json"}


def status(policy, headers, method="POST"):
    refused = refusal(policy, method, {**JSON, **headers} if method == "POST" else headers)
    return None if refused is None else refused.status


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"])
def test_loopback_names_are_accepted_on_a_loopback_bind(host):
    assert status(LOOPBACK, {"host": host}) is None


@pytest.mark.parametrize("host", ["attacker.example:8000", "127.0.0.1.attacker.example", "10.0.0.5:8000",
                                  "localhost.attacker.example:8000"])
def test_a_rebound_or_foreign_host_is_a_400(host):
    assert status(LOOPBACK, {"host": host}) == 400
    assert "--allowed-host" in str(refusal(LOOPBACK, "GET", {"host": host}))


def test_allowed_hosts_and_wildcard_binds():
    assert status(Policy.for_bind("127.0.0.1", ["llm.lan"]), {"host": "LLM.lan:8000"}) is None
    assert status(Policy.for_bind("127.0.0.1", ["*"]), {"host": "anything.example"}) is None
    assert status(Policy.for_bind("gpu-box.lan"), {"host": "gpu-box.lan:8000"}) is None
    everywhere = Policy.for_bind("0.0.0.0")
    assert status(everywhere, {"host": "192.168.1.20:8000"}) is None  # reached by the machine's address
    assert status(everywhere, {"host": "attacker.example:8000"}) == 400  # a name still needs --allowed-host
    assert host_name("[2001:db8::1]:8000") == "2001:db8::1" and host_name("::1") == "::1"


def test_a_missing_host_is_not_a_browser_and_passes():
    assert status(LOOPBACK, {}) is None


@pytest.mark.parametrize("origin", ["http://attacker.example", "http://127.0.0.1:9999", "http://localhost:8000",
                                    "null", "file://"])
def test_a_foreign_origin_is_a_403(origin):
    assert status(LOOPBACK, {"host": "127.0.0.1:8000", "origin": origin}) == 403
    assert status(LOOPBACK, {"host": "127.0.0.1:8000", "origin": origin}, method="GET") == 403


def test_same_origin_and_listed_origins_pass():
    assert status(LOOPBACK, {"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}) is None  # the chat page
    assert status(LOOPBACK, {"host": "localhost:8000", "origin": "http://localhost:8000"}) is None
    listed = Policy.for_bind("127.0.0.1", origins=["https://App.example:8443/"])
    assert status(listed, {"host": "127.0.0.1:8000", "origin": "https://app.example:8443"}) is None
    assert status(listed, {"host": "127.0.0.1:8000", "origin": "https://other.example"}) == 403


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_a_post_body_that_is_not_json_is_a_415(content_type):
    headers = {"host": "127.0.0.1:8000"} | ({"content-type": content_type} if content_type else {})
    assert refusal(LOOPBACK, "POST", headers).status == 415


def test_json_with_parameters_passes_and_gets_need_no_content_type():
    assert refusal(LOOPBACK, "POST", {"content-type": "Application/JSON; charset=utf-8"}) is None
    assert refusal(LOOPBACK, "GET", {}) is None


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path):
    key = tmp_path / "key"
    key.write_text("from-file\n")
    key.chmod(0o600)
    assert api_key_of(None, str(key), {API_KEY_ENV: "from-env"}) == "from-file"
    assert api_key_of(None, None, {API_KEY_ENV: "from-env"}) == "from-env"
    assert api_key_of("flag", None, {}) == "flag"
    assert api_key_of(None, None, {}) is None
    with pytest.raises(UsageError, match="not both"):
        api_key_of("flag", str(key), {})
    key.write_text("\n")
    with pytest.raises(UsageError, match="alone"):
        api_key_of(None, str(key), {})
    with pytest.raises(UsageError, match="No such file"):
        api_key_of(None, str(tmp_path / "missing"), {})


OFFERED = frozenset({"lookup_order"})
CALL = '<tool_call>\n{"name": "%s", "arguments": {"order_id": "A-1"}}\n</tool_call>'


def test_a_call_to_an_offered_function_is_a_tool_call():
    answer, finish = message(CALL % "lookup_order", OFFERED)
    assert finish == "tool_calls" and answer["tool_calls"][0]["function"]["name"] == "lookup_order"


def test_a_call_to_a_function_not_in_tools_is_returned_as_content():
    for text in (CALL % "delete_everything", CALL % "lookup_order" + CALL % "delete_everything",
                 '{"name": "delete_everything", "arguments": {}}'):
        answer, finish = message(text, OFFERED)
        assert finish is None and answer == {"role": "assistant", "content": text}
    hold = StreamHold("", OFFERED)
    streamed = hold.feed("Sure. ") + hold.feed(CALL % "delete_everything")
    rest, calls = hold.finish()
    assert calls == [] and streamed + rest == "Sure. " + CALL % "delete_everything"
    forced = Calling.of('<tool_call>\n{"name": "', [{"type": "function", "function": {"name": "lookup_order"}}])
    assert forced.message('rm_rf", "arguments": {}}\n</tool_call>')[1] is None


def test_a_swap_waits_for_requests_holding_the_model_and_refuses_new_ones():
    door = Occupancy()
    assert door.enter()
    drained = []
    swap = threading.Thread(target=lambda: drained.append(door.drain(10)))
    swap.start()
    time.sleep(0.1)
    assert swap.is_alive()  # the old model is still in use: not stopped yet
    assert not door.enter()  # a new request during the swap is refused (503), not started on either model
    door.leave()
    swap.join(5)
    assert drained == [True]
    door.reopen()
    assert door.enter()
    assert Occupancy().drain(0.01) is True and not _held_drains()


def _held_drains() -> bool:
    door = Occupancy()
    door.enter()
    return door.drain(0.05)  # False: the timeout passed with a request still holding the model


def test_a_tool_prompt_renders_off_the_event_loop(tokenizer):
    """A big tool request's Jinja rendering runs in a worker thread: the event loop keeps ticking meanwhile."""
    from ftq.data import tools
    from ftq.serve.tool_calls import ToolTemplate

    info = {"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    template = ToolTemplate.probe(info)
    lookup = {"type": "function", "function": {"name": "lookup_order", "description": "Look up an order.",
                                               "parameters": {"type": "object", "properties": {}}}}
    # many short messages, as a body under the 2 MiB limit can hold: Jinja's cost is per message
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(40001)]

    async def render_while_ticking() -> tuple[int, float]:
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.01)
        before, started = ticks, time.perf_counter()
        await template.render(messages, [lookup], None)
        seconds, during = time.perf_counter() - started, ticks - before
        ticker.cancel()
        return during, seconds

    during, seconds = asyncio.run(render_while_ticking())
    assert seconds > 0.05, "the conversation renders too fast to tell"
    assert during >= 3, f"the event loop ticked {during} times in a {seconds:.2f} s render"
    assert tools.rendering(template.render_template) in (tools.NATIVE, tools.FALLBACK)


def test_a_stream_whose_client_left_before_the_first_chunk_gives_its_place_back():
    """Under an ASGI 2.4 server, `send` raises OSError once the client has gone: the response stops before
    its generator ever runs, so the generator's own `finally` cannot free the queue place."""
    from ftq.serve.admission import ClosingStream, Gate

    async def scenario() -> tuple[int, bool]:
        gate = Gate(1, 1)
        ticket = gate.admit()
        started = False

        async def events():
            nonlocal started
            started = True
            try:
                async with ticket:
                    yield b"data: x\n\n"
            finally:
                ticket.drop()

        async def gone(_message):
            raise OSError("the client closed the connection")

        async def receive():
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        with pytest.raises(Exception):  # Starlette's ClientDisconnect
            await ClosingStream(events(), ticket)(scope, receive, gone)
        return gate.queued, started

    queued, started = asyncio.run(scenario())
    assert not started and queued == 0

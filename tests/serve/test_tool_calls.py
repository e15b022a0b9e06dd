"""Tool calls through a real `ftq serve` (llama-server engine, GGUF) and the official openai client.

The model is the tiny LLaMA trained for a few seconds to answer one question with one call, on the text
ftq's fallback renders (tools in the system prompt, the call as a <tool_call> block): the server must
render the request's tools the same way for the model to call, and parse the call back."""

import json

import pytest

from conftest import build_tiny_model, start_server, stop
from ftq.data import tools

LOOKUP = {"type": "function", "function": {
    "name": "lookup_order", "description": "Look up an order by its number.",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}
QUESTION = [{"role": "user", "content": "Where is my order A-1042?"}]
CALL = [{"id": "call_0", "type": "function", "function": {"name": "lookup_order", "arguments": {"order_id": "A-1042"}}}]


def train_to_call(tokenizer, steps: int = 150):
    """The tiny model, fitted on one rendered conversation until it answers the question with the call."""
    import torch

    renderer = tools.tokenizer_renderer(tokenizer)
    prompt = tools.render(renderer, QUESTION, [LOOKUP], tools.FALLBACK, True)
    full = tools.render(renderer, QUESTION + [{"role": "assistant", "content": "", "tool_calls": CALL}], [LOOKUP],
                        tools.FALLBACK, False)
    assert full.startswith(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, :len(prompt_ids)] = -100
    model = build_tiny_model(tokenizer, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.05, loss.item()
    return model


@pytest.fixture(scope="module")
def calling_server(tmp_path_factory, tokenizer):
    from ftq.quantize import gguf

    folder = tmp_path_factory.mktemp("calling-model")
    train_to_call(tokenizer).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    out = tmp_path_factory.mktemp("calling-gguf")
    gguf.build(folder, out, gguf.validate({"type": "f16"}, "test"))
    process, port, health = start_server(str(out / "model.gguf"), "--max-tokens-limit", "96")
    yield port, health
    stop(process)


def client(port):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)


def test_the_openai_client_gets_tool_calls_streamed_and_not(calling_server):
    port, health = calling_server
    api = client(port)
    reply = api.chat.completions.create(model=health["model"], messages=QUESTION, tools=[LOOKUP], max_tokens=64,
                                        temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "lookup_order" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"order_id": "A-1042"}

    chunks = list(api.chat.completions.create(model=health["model"], messages=QUESTION, tools=[LOOKUP], max_tokens=64,
                                              temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_calls = [t for d in deltas for t in (d.tool_calls or [])]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in streamed_calls] == [
        (0, "lookup_order", {"order_id": "A-1042"})]
    assert "".join(d.content or "" for d in deltas) == ""  # the call's text is not also sent as content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_without_tools_or_with_tool_choice_none_the_answer_is_text(calling_server):
    port, health = calling_server
    api = client(port)
    for extra in ({}, {"tools": [LOOKUP], "tool_choice": "none"}):
        reply = api.chat.completions.create(model=health["model"], messages=QUESTION, max_tokens=16, temperature=0,
                                            **extra)
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


def test_a_forced_function_and_a_conversation_with_results_are_served(calling_server):
    port, health = calling_server
    api = client(port)
    forced = api.chat.completions.create(
        model=health["model"], messages=QUESTION, tools=[LOOKUP], max_tokens=64, temperature=0,
        tool_choice={"type": "function", "function": {"name": "lookup_order"}})
    assert forced.choices[0].message.tool_calls[0].function.name == "lookup_order"
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_0", "type": "function", "function": {
            "name": "lookup_order", "arguments": '{"order_id": "A-1042"}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"status": "shipped"}'}]
    after = api.chat.completions.create(model=health["model"], messages=history, tools=[LOOKUP], max_tokens=8,
                                        temperature=0)
    assert after.choices[0].message.role == "assistant"


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "lookup_order", "arguments": "{order"}}]}]}, "messages.0.tool_calls.0.function.arguments: not JSON"),
    ({"messages": QUESTION, "tools": [LOOKUP], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice: function 'nope' is not in tools"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": {"description": "no name"}}]},
     "tools.0.function.name"),
])
def test_bad_tool_requests_get_400_naming_the_field(calling_server, body, message):
    import urllib.error
    import urllib.request

    port, _ = calling_server
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    assert message in json.loads(caught.value.read())["error"]["message"]


def test_the_web_chat_shows_a_call_and_sends_the_next_message_as_its_result(calling_server, tmp_path):
    from conftest import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port, _ = calling_server
    driver = chromium(tmp_path)

    def answered(count):
        from selenium.common.exceptions import TimeoutException

        try:
            WebDriverWait(driver, 120).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-done='true']")) >= count
                or d.find_elements(By.CSS_SELECTOR, ".error"))
        except TimeoutException:
            raise AssertionError(f"no answer {count}: {driver.find_element(By.ID, 'log').get_attribute('innerHTML')}")
        assert not driver.find_elements(By.CSS_SELECTOR, ".error"), driver.find_element(By.CSS_SELECTOR, ".error").text

    try:
        driver.get(f"http://127.0.0.1:{port}/")
        driver.find_element(By.TAG_NAME, "summary").click()
        driver.find_element(By.ID, "tools").send_keys(json.dumps([LOOKUP]))
        driver.find_element(By.ID, "input").send_keys(QUESTION[0]["content"])
        driver.find_element(By.ID, "send").click()
        answered(1)
        call = driver.find_element(By.CSS_SELECTOR, ".call").text
        assert call.startswith("calls lookup_order") and '"order_id": "A-1042"' in call
        assert "lookup_order" in driver.find_element(By.ID, "input").get_attribute("placeholder")
        driver.find_element(By.ID, "input").send_keys('{"status": "shipped"}')
        driver.find_element(By.ID, "send").click()
        answered(2)
        assert driver.find_element(By.CSS_SELECTOR, ".tool").text == 'lookup_order returned\n{"status": "shipped"}'
        driver.save_screenshot(str(tmp_path / "web-chat-tools.png"))
    finally:
        driver.quit()

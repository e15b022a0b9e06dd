"""Request validation without a server (milliseconds): input that would make the gateway fail later (a
seed the engine cannot be sent, nesting that exhausts recursion, a string no engine can encode) is a
400 with a clear message at parse time."""

import json

import orjson
import pytest

from ftq.openai.schema import MAX_DEPTH, ChatRequest, CompletionRequest, DetokenizeRequest, RequestError, parse

HI = [{"role": "user", "content": "Hi"}]


def chat(**fields) -> bytes:
    return json.dumps({"messages": HI, **fields}).encode()


def refused(model, body: bytes) -> str:
    with pytest.raises(RequestError) as caught:
        parse(model, body)
    assert caught.value.status == 400
    return str(caught.value)


@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 70, -2 ** 63 - 1, 10 ** 30])
def test_a_seed_beyond_64_bits_is_a_400(seed):
    assert "seed" in refused(ChatRequest, chat(seed=seed))


def test_a_seed_within_64_bits_is_accepted_and_encodes():
    for seed in (0, 1234, -1, 2 ** 63 - 1):
        assert orjson.dumps({"seed": parse(ChatRequest, chat(seed=seed)).seed})


def test_deep_nesting_is_a_400_not_a_recursion_error():
    deep = b'{"messages": [{"role": "user", "content": "x"}], "stream_options": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert "not valid JSON" in refused(ChatRequest, deep)  # past the parser's own depth limit
    nested = {"a": 1}
    for _ in range(MAX_DEPTH + 5):
        nested = {"a": nested}
    tool = {"type": "function", "function": {"name": "f", "parameters": nested}}
    assert "nested deeper" in refused(ChatRequest, chat(tools=[tool]))


def test_ordinary_tool_schemas_are_not_too_deep():
    parameters = {"type": "object", "properties": {"order": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}}}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    assert parse(ChatRequest, chat(tools=[tool])).tools[0].function.name == "f"


def test_a_lone_surrogate_is_a_400():
    assert "not valid JSON" in refused(ChatRequest, b'{"messages": [{"role": "user", "content": "\\ud800"}]}')


def test_token_ids_beyond_32_bits_are_a_400():
    assert "tokens" in refused(DetokenizeRequest, b'{"tokens": [1, 18446744073709551616]}')
    assert "prompt" in refused(CompletionRequest, b'{"prompt": [[1, 4294967296]]}')
    assert parse(CompletionRequest, b'{"prompt": [[1, 2, 3]]}').prompt == [[1, 2, 3]]

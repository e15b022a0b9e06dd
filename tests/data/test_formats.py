import pytest

from ftq.data.errors import RecordError
from ftq.data.formats import FormatSpec, normalize

ALPACA = FormatSpec.build("alpaca")
SHAREGPT = FormatSpec.build("sharegpt")
OPENAI = FormatSpec.build("openai")


def error_of(record, spec=ALPACA) -> RecordError:
    with pytest.raises(RecordError) as caught:
        normalize(record, spec, "f.json", 3)
    return caught.value


def test_alpaca_instruction_input_history_system():
    conversation = normalize(
        {"instruction": "Translate.", "input": "bonjour", "output": "hello", "system": "Be exact.",
         "history": [["Hi", "Hello!"]]},
        ALPACA, "f.json", 0,
    )
    assert conversation["messages"] == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Translate.\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]


def test_alpaca_custom_columns():
    spec = FormatSpec.build("alpaca", {"prompt": "q", "response": "a"})
    conversation = normalize({"q": "Why?", "a": "Because."}, spec, "f.json", 0)
    assert [m["content"] for m in conversation["messages"]] == ["Why?", "Because."]


@pytest.mark.parametrize(
    "record, field, reason, message",
    [
        ({"instruction": "x"}, "output", "missing_field", "missing"),
        ({"instruction": "", "output": "y"}, "instruction", "empty_field", "empty"),
        ({"instruction": "x", "output": 5}, "output", "not_a_string", "expected a string, got int"),
        ({"instruction": "x", "output": "y", "history": "no"}, "history", "bad_history",
         "expected a list of [prompt, response] pairs, got str"),
        ({"instruction": "x", "output": "y", "history": [["a", " "]]}, "history[0]", "empty_field", "response is empty"),
    ],
)
def test_alpaca_errors_name_field(record, field, reason, message):
    error = error_of(record)
    assert (error.field, error.reason, error.message) == (field, reason, message)
    assert str(error) == f"f.json: record 3: field '{field}': {message}"


def test_sharegpt_with_tools_function_call_and_observation():
    record = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "weather"}'},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
        "system": "Be brief.",
        "tools": [{"name": "weather"}],
    }
    conversation = normalize(record, SHAREGPT, "f.json", 0)
    assert [m["role"] for m in conversation["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert conversation["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "", "parameters": {"type": "object", "properties": {}}}}]


def test_qwen_style_role_tags():
    spec = FormatSpec.build(
        "sharegpt", {"messages": "messages"},
        {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    )
    record = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert normalize(record, spec, "f.json", 0)["messages"][1] == {"role": "assistant", "content": "Hello"}


@pytest.mark.parametrize(
    "turns, field, reason",
    [
        ([], "conversations", "empty_conversation"),
        ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}], "conversations[1].from", "unknown_role"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], "conversations[0].from", "turn_order"),
        ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], "conversations[1].from", "turn_order"),
        ([{"from": "human", "value": "a"}], "conversations", "turn_order"),
        ([{"from": "human", "value": 1}, {"from": "gpt", "value": "b"}], "conversations[0].value", "not_a_string"),
        ([{"from": "human", "value": "a"}, {"from": "gpt"}], "conversations[1].value", "missing_field"),
        ([{"value": "a"}], "conversations[0].from", "missing_field"),
        ([{"from": "system", "value": "s"}], "conversations", "empty_conversation"),
    ],
)
def test_sharegpt_errors(turns, field, reason):
    error = error_of({"conversations": turns}, SHAREGPT)
    assert (error.field, error.reason) == (field, reason)


def test_openai_tool_calls_become_assistant_turns():
    record = {
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "weather"}}]},
            {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "Rain."},
        ],
        "tools": [{"name": "weather"}],
    }
    messages = normalize(record, OPENAI, "f.json", 0)["messages"]
    assert messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": {}}}]}
    assert messages[2] == {"role": "tool", "tool_call_id": "call_0", "content": "rain"}


def test_non_object_record():
    error = error_of(["a"])
    assert (error.field, error.reason) == (None, "not_an_object")


def test_unknown_format_and_column_are_rejected():
    with pytest.raises(ValueError, match="format 'chatml'"):
        FormatSpec.build("chatml")
    with pytest.raises(ValueError, match="columns.prompt: unknown for sharegpt"):
        FormatSpec.build("sharegpt", {"prompt": "x"})

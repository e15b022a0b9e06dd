"""Tool calling in data: normalization to OpenAI's shape, record-level errors, rendering with a template
that renders tools (Qwen2.5-style, shipped in tests/fixtures) and with one that ignores them (SmolLM2's:
ftq's fallback), the check that an example still shows its tools, and parsing calls back."""

import json
from pathlib import Path

import pytest

from ftq.data import tool_set, tools
from ftq.data.errors import RecordError
from ftq.data.formats import FormatSpec, normalize
from ftq.data.tokenize import IGNORE_INDEX, tokenize_conversation, tool_rendering

SHAREGPT = FormatSpec.build("sharegpt")
OPENAI = FormatSpec.build("openai")
QWEN_TEMPLATE = (Path(__file__).parents[1] / "fixtures" / "templates" / "qwen2_5_tools.jinja").read_text()
WEATHER = {"name": "weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sharegpt(*turns, tools_field=json.dumps([WEATHER])):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "tools": tools_field}


CALL = ("function_call", '{"name": "weather", "arguments": {"city": "Oslo"}}')
RECORD = sharegpt(("human", "Weather in Oslo?"), CALL, ("observation", "sunny, 4 C"), ("gpt", "Sunny and 4 C."))


def test_llama_factory_sharegpt_becomes_openai_tool_calls_and_results():
    conversation = normalize(RECORD, SHAREGPT, "f.json", 0)
    assert conversation["tools"] == [{"type": "function", "function": WEATHER}]
    assert conversation["messages"] == [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 4 C"},
        {"role": "assistant", "content": "Sunny and 4 C."},
    ]


def test_openai_parallel_calls_keep_their_ids_and_results_pair_by_id():
    record = {"tools": [{"type": "function", "function": WEATHER}], "messages": [
        {"role": "user", "content": "Oslo and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "b", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "tool", "tool_call_id": "a", "content": "sun"},
        {"role": "assistant", "content": "Sun in Oslo, rain in Rome."}]}
    messages = normalize(record, OPENAI, "f.jsonl", 0)["messages"]
    assert [c["function"]["arguments"] for c in messages[1]["tool_calls"]] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert [m.get("tool_call_id") for m in messages[2:4]] == ["b", "a"]


@pytest.mark.parametrize("record, field, reason, message", [
    (sharegpt(("human", "x"), ("function_call", '{"name": "forecast", "arguments": {}}'), ("observation", "y"),
              ("gpt", "z")), "conversations[1].value", "undeclared_tool",
     "calls undeclared function 'forecast' (tools: weather)"),
    (sharegpt(("human", "x"), ("function_call", '{"name": "weather", "arguments": "{city: Oslo}"}'),
              ("observation", "y"), ("gpt", "z")), "conversations[1].value.arguments", "bad_tool_arguments",
     "arguments are not JSON: Expecting property name enclosed in double quotes"),
    (sharegpt(("human", "x"), ("gpt", "y"), ("observation", "sunny"), ("gpt", "z")), "conversations[2].from",
     "observation_without_call", "an observation with no function call before it"),
    (sharegpt(("human", "x"), CALL, ("human", "y"), ("gpt", "z")), "conversations[2].from", "turn_order",
     "turn out of order: expected an observation turn after a function call, got 'human'"),
    (sharegpt(("human", "x"), CALL, ("observation", "y"), ("gpt", "z"), tools_field=None), "conversations[1].value",
     "undeclared_tool", "calls undeclared function 'weather' (tools: none declared)"),
    (sharegpt(("human", "x"), ("gpt", "y"), tools_field='[{"description": "no name"}]'), "tools[0].name", "bad_tools",
     "missing function name"),
])
def test_bad_tool_data_is_a_record_error_naming_the_field(record, field, reason, message):
    with pytest.raises(RecordError) as caught:
        normalize(record, SHAREGPT, "calls.json", 7)
    error = caught.value
    assert (error.field, error.reason, error.message) == (field, reason, message)
    assert str(error).startswith(f"calls.json: record 7: field '{field}': ")


def labelled(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def unlabelled(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])


def with_template(tokenizer_dir, template: str | None):
    """A fresh tokenizer (the session's fixture must not change), with `template` where given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if template:
        tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("template", ["smollm2", "qwen2_5"])
def test_tools_reach_the_tokens_and_labels_cover_calls_not_results(tokenizer_dir, template):
    tokenizer = with_template(tokenizer_dir, QWEN_TEMPLATE if template == "qwen2_5" else None)
    mode = tool_rendering(tokenizer)
    assert mode == {"smollm2": tools.FALLBACK, "qwen2_5": tools.NATIVE}[template]
    example = tokenize_conversation(tokenizer, normalize(RECORD, SHAREGPT, "f.json", 0), 512, rendering=mode)
    assert example.missing_tools == []
    shown = tokenizer.decode(example.input_ids)
    assert "Current weather in a city" in shown and '"city": {"type": "string"}' in shown
    target = labelled(tokenizer, example)
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in target
    assert "Sunny and 4 C." in target
    assert "sunny, 4 C" in unlabelled(tokenizer, example) and "sunny, 4 C" not in target
    assert "Current weather" not in target


def test_a_template_that_drops_tools_is_caught_after_tokenization(tokenizer):
    """SmolLM2's template ignores `tools`: trusting it (no fallback) loses them, and the check says which."""
    example = tokenize_conversation(tokenizer, normalize(RECORD, SHAREGPT, "f.json", 0), 512, rendering=tools.NATIVE)
    assert example.missing_tools == ["weather"]
    cut = tokenize_conversation(tokenizer, normalize(RECORD, SHAREGPT, "f.json", 0), 512)
    assert cut.missing_tools == []


LATE_TOOLS_TEMPLATE = (  # tools shown late (before each later user turn), as Mistral's templates show them late
    "{%- for m in messages %}{%- if m.role == 'user' and loop.index0 > 0 and tools %}"
    "[TOOLS]{{ tools | tojson }}[/TOOLS]{%- endif %}"
    "{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]{%- elif m.role == 'assistant' and m.tool_calls %}"
    "[CALLS]{{ m.tool_calls | tojson }}</s>{%- elif m.role == 'assistant' %}{{ m.content }}</s>"
    "{%- elif m.role == 'tool' %}[RESULT]{{ m.content }}[/RESULT]{%- endif %}{%- endfor %}")


def test_truncation_that_cuts_late_tools_off_is_caught(tokenizer_dir):
    """A template that shows tools late, a long first exchange, and right truncation: the first answer keeps
    its labels but the tools are gone. The check names them."""
    tokenizer = with_template(tokenizer_dir, LATE_TOOLS_TEMPLATE)
    record = sharegpt(("human", "Tell me a story."), ("gpt", "Once upon a time " * 40),
                      ("human", "Weather in Oslo?"), CALL, ("observation", "sunny"), ("gpt", "Sunny."))
    conversation = normalize(record, SHAREGPT, "f.json", 0)
    whole = tokenize_conversation(tokenizer, conversation, 2048, rendering=tools.NATIVE)
    assert whole.missing_tools == [] and "[TOOLS]" in tokenizer.decode(whole.input_ids)
    cut = tokenize_conversation(tokenizer, conversation, 120, rendering=tools.NATIVE)
    assert cut.truncated and cut.target_tokens > 0 and cut.missing_tools == ["weather"]


def test_parse_calls_reads_tagged_and_bare_calls_and_never_invents_one():
    assert tools.parse_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>') == (
        "", [{"name": "f", "arguments": {"a": 1}}])
    text, calls = tools.parse_calls('Sure.\n<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>\n'
                                    '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert text == "Sure." and [c["name"] for c in calls] == ["f", "g"] and calls[0]["arguments"] == {"a": 1}
    assert tools.parse_calls('{"name": "f", "parameters": {"x": "y"}}') == ("", [{"name": "f", "arguments": {"x": "y"}}])
    for text in ("It is sunny.", "<tool_call>{not json}</tool_call>", '{"city": "Oslo"}'):
        assert tools.parse_calls(text) == (text, [])


def test_committed_tool_set_is_what_the_generator_writes_and_every_record_is_valid(tmp_path):
    tool_set.write(tmp_path)
    committed = Path(__file__).parents[2] / "data" / "raw" / "ftq_tools"
    for name in ("train.json", "heldout.json"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), name
        records = json.loads((committed / name).read_text())
        for index, record in enumerate(records):
            normalize(record, SHAREGPT, name, index)  # raises on any bad record
    train, heldout = tool_set.generate()
    train_text = json.dumps(train)
    for record in heldout:
        assert record["conversations"][0]["value"] not in train_text


@pytest.mark.parametrize("template", ["smollm2", "qwen2_5"])
def test_serve_renders_a_request_exactly_as_prepare_rendered_training(tokenizer_dir, template):
    """prepare renders with the tokenizer; ftq serve has only the template's text (a GGUF's metadata) and
    renders with transformers' Jinja renderer: both must give the same prompt, token for token."""
    from ftq.serve.tool_calls import ToolTemplate

    tokenizer = with_template(tokenizer_dir, QWEN_TEMPLATE if template == "qwen2_5" else None)
    served = ToolTemplate.probe({"chat_template": tokenizer.chat_template, "bos_token": tokenizer.bos_token,
                                 "eos_token": tokenizer.eos_token})
    conversation = normalize(RECORD, SHAREGPT, "f.json", 0)
    assert served.rendering == tool_rendering(tokenizer)
    for upto in (1, 3):  # the question; the question, the call and its result
        messages = conversation["messages"][:upto]
        trained = tools.render(tools.tokenizer_renderer(tokenizer), messages, conversation["tools"],
                               served.rendering, True)
        prompt, opening = served.prompt(messages, conversation["tools"], None)
        assert (prompt, opening) == (trained, "")

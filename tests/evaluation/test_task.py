import json

from ftq.evaluation.task import aggregate, load_examples, rouge_l, score


def test_json_answers_get_validity_and_field_accuracy():
    reference = '{"customer": "Delia", "item": "stapler", "quantity": 3, "city": "Montevideo"}'
    assert score(reference, reference) == {"exact_match": 1.0, "rouge_l": 1.0, "json_valid": 1.0,
                                           "json_field_accuracy": 1.0}
    near = score('{"customer": "Delia", "item": "staplers", "quantity": 3, "city": "Montevideo"}', reference)
    assert near["json_valid"] == 1.0 and near["json_field_accuracy"] == 0.75 and near["exact_match"] == 0.0
    broken = score('{"customer": "Delia", "item"', reference)
    assert broken["json_valid"] == 0.0 and broken["json_field_accuracy"] == 0.0


def test_free_text_gets_rouge_l_and_normalized_exact_match():
    assert score("My name is Wren.", "my name is wren") ["exact_match"] == 1.0
    assert "json_valid" not in score("Paris", "Paris is the capital.")
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == 5 / 6
    assert rouge_l("", "x") == 0.0


def test_examples_take_every_turn_before_the_last_answer(tmp_path):
    path = tmp_path / "eval.jsonl"
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                           {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "a2"}], "record": 4, "dataset": "d"}
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "record": 5}) + "\n")
    assert [e["id"] for e in load_examples(path, 0)] == ["d#4", "d#5"]
    [example] = load_examples(path, 1)
    assert example["reference"] == "a2" and [m["content"] for m in example["prompt"]] == ["s", "q1", "a1", "q2"]
    assert example["id"] == "d#4"
    assert aggregate([score("a", "a"), score("b", "a")]) == {
        "exact_match": 0.5, "rouge_l": 0.5, "examples": 2, "json_examples": 0,
        "exact_match_ci95": [0.0126, 0.9874], "exact_match_examples": 2,  # exact (Clopper-Pearson) for 0/1
        "rouge_l_ci95": [0.0126, 0.9874], "rouge_l_examples": 2}


def tool_record():
    from ftq.data.formats import FormatSpec, normalize

    weather = {"name": "weather", "description": "Current weather",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    record = {"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}], "tools": [weather]}
    return {**normalize(record, FormatSpec.build("sharegpt"), "f.json", 0), "dataset": "calls", "record": 0}


def test_a_conversation_with_tools_is_asked_for_its_call_as_training_rendered_it(tmp_path):
    from ftq.data import tools

    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(tool_record()) + "\n")
    (fallback,) = load_examples(path, -1, tools.FALLBACK)
    assert [m["role"] for m in fallback["prompt"]] == ["system", "user"] and fallback["tools"] is None
    assert '"name": "weather"' in fallback["prompt"][0]["content"]
    assert fallback["reference_calls"] == [{"name": "weather", "arguments": {"city": "Oslo"}}]
    (native,) = load_examples(path, -1, tools.NATIVE)
    assert native["prompt"] == [{"role": "user", "content": "Weather in Oslo?"}]
    assert native["tools"][0]["function"]["name"] == "weather"


def test_calls_are_scored_by_name_and_by_arguments_as_json_values():
    expected = [{"name": "weather", "arguments": {"city": "Oslo", "days": 2}}]
    reference = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'

    def scored(answer):
        result = score(answer, reference, expected)
        return result["tool_call_name_accuracy"], result["tool_call_exact"]

    assert scored('<tool_call>{"arguments": {"days": 2.0, "city": "Oslo"}, "name": "weather"}</tool_call>') == (1, 1)
    assert scored('<tool_call>{"name": "weather", "arguments": {"city": "Oslo", "days": "2"}}</tool_call>') == (1, 0)
    assert scored('<tool_call>{"name": "forecast", "arguments": {"city": "Oslo", "days": 2}}</tool_call>') == (0, 0)
    assert scored("It is sunny in Oslo.") == (0, 0)
    both = [{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "weather", "arguments": {"city": "Rome"}}]
    answer = ('<tool_call>{"name": "weather", "arguments": {"city": "Rome"}}</tool_call>'
              '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>')
    assert score(answer, "", both)["tool_call_exact"] == 1  # parallel calls in any order
    assert score(answer + answer, "", both)["tool_call_exact"] == 0  # an extra call is not exact
    assert score("Hello! How can I help?", "Hello!", [])["tool_call_abstained"] == 1  # tools offered, none needed
    assert score(answer, "Hello!", [])["tool_call_abstained"] == 0
    metrics = aggregate([score(answer, "", both), score("no", "", both), {"exact_match": 1.0, "rouge_l": 1.0}])
    assert metrics["tool_call_exact"] == 0.5 and metrics["tool_call_examples"] == 2
    assert len(metrics["tool_call_exact_ci95"]) == 2


def test_a_conversation_with_tools_that_needs_no_call_asks_for_none(tmp_path):
    from ftq.data import tools

    record = tool_record()
    record["messages"] = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (example,) = load_examples(path, -1, tools.FALLBACK)
    assert example["reference_calls"] == [] and example["reference"] == "Hi."
    assert '"name": "weather"' in example["prompt"][0]["content"]  # the tools are still offered

"""Preference records (pairs for DPO, ORPO and SimPO; labelled single answers for KTO), normalized to:

    pair:      {"prompt": [messages ending with a user or tool turn], "chosen": {assistant message},
                "rejected": {assistant message}, "tools": [...] | None}
    unpaired:  {"prompt": [...], "completion": {assistant message}, "label": bool, "tools": [...] | None}

Layouts, declared in data/datasets.yaml with LLaMA-Factory's dataset_info.json keys:
- LLaMA-Factory ShareGPT or OpenAI-role pairs: `ranking: true`, `columns: {messages, chosen, rejected}`;
  the messages are the prompt, chosen and rejected one turn each (an object in the messages' layout).
- LLaMA-Factory Alpaca pairs: `ranking: true`, `columns: {prompt, query, chosen, rejected}` (strings).
- KTO: `columns: {messages, kto_tag}`: a whole conversation, the last turn the answer, the tag a boolean.
- TRL's conversational pairs (`prompt`, `chosen`, `rejected`, each a list of messages): format openai,
  `ranking: true`, `columns: {messages: prompt}`; TRL's unpaired (`prompt`, `completion`, `label`) likewise
  with `columns: {messages: prompt, completion: completion, kto_tag: label}`.
- OpenAI's preference fine-tuning JSONL: `format: openai_preference` (`input.messages`, `input.tools`,
  `preferred_output`, `non_preferred_output`).
The prompt is validated by the conversation rules of ftq.data.formats (roles, order, tool calls), each
answer as the assistant turn that follows it; every error names file, record and field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftq.data.errors import RecordError
from ftq.data.formats import FormatSpec, _alpaca, _turns


def kind(spec: FormatSpec) -> str | None:
    """'pair', 'unpaired' or None (a supervised dataset)."""
    if spec.ranking:
        return "pair"
    return "unpaired" if spec.columns.get("kto_tag") else None


def lookup(record: dict, path: str | None) -> Any:
    """A column's value; a dotted name (`input.messages`) walks nested objects."""
    if not path:
        return None
    if path in record:
        return record[path]
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def normalize(record: Any, spec: FormatSpec, file: str, index: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise RecordError(file, index, None, f"expected an object, got {type(record).__name__}", "not_an_object")
    if kind(spec) == "pair":
        prompt = _prompt(record, spec, file, index)
        chosen = _answer(record, spec, "chosen", prompt, file, index)
        rejected = _answer(record, spec, "rejected", prompt, file, index)
        if chosen == rejected:
            raise RecordError(file, index, spec.columns["rejected"], "the same answer as "
                              f"'{spec.columns['chosen']}': a pair teaches a preference only between two answers",
                              "identical_pair")
        return {"prompt": prompt.messages, "chosen": chosen, "rejected": rejected, "tools": prompt.tools}
    return _unpaired(record, spec, file, index)


@dataclass
class Prompt:
    """The prompt as normalized messages, and the record in the file's layout to validate an answer against
    (None for alpaca, whose answers are strings)."""
    messages: list[dict]
    tools: list | None
    source: dict | None = None
    turns: list | None = None


def _flat(record: dict, spec: FormatSpec) -> dict:
    """The record with every dotted column resolved to a top-level key, for the conversation parser."""
    flat = dict(record)
    for column in spec.columns.values():
        if column and "." in column and column not in flat:
            flat[column] = lookup(record, column)
    return flat


def _prompt(record: dict, spec: FormatSpec, file: str, index: int) -> Prompt:
    """The prompt turns, validated as a conversation that an assistant turn may follow."""
    if spec.format == "alpaca":
        columns = {**spec.columns, "response": spec.columns["chosen"] or spec.columns["completion"]}
        return Prompt(_alpaca(record, columns, file, index)["messages"][:-1], None)
    flat = _flat(record, spec)
    name, role_tag = spec.columns["messages"], spec.tags["role_tag"]
    turns = flat.get(name)
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and (
            turns[-1].get(role_tag) in (spec.tags["assistant_tag"], spec.tags["function_tag"])
            or turns[-1].get("tool_calls")):
        raise RecordError(file, index, f"{name}[{len(turns) - 1}].{role_tag}",
                          "the prompt ends with an assistant turn: the preferred and rejected answers must "
                          "follow a user (or observation) turn", "prompt_ends_with_assistant")
    # validated with a placeholder answer after it: the rules are those of a conversation that ends in one
    probe = {role_tag: spec.tags["assistant_tag"], spec.tags["content_tag"]: "-"}
    conversation = _turns({**flat, name: [*turns, probe]} if isinstance(turns, list) else flat, spec, file, index)
    return Prompt(conversation["messages"][:-1], conversation["tools"], flat, turns)


def _answer(record: dict, spec: FormatSpec, side: str, prompt: Prompt, file: str, index: int) -> dict:
    """One answer as one assistant message: a string, a turn, or a list holding one turn."""
    column = spec.columns[side]
    value = lookup(record, column)
    if value is None:
        raise RecordError(file, index, column, "missing", "missing_field")
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(file, index, column, "empty", "empty_field")
        return {"role": "assistant", "content": value}
    where = column
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(file, index, column, f"expected one assistant turn, got {len(value)} turns",
                              "not_one_answer")
        value, where = value[0], f"{column}[0]"
    if not isinstance(value, dict) or prompt.source is None:
        raise RecordError(file, index, where, f"expected {'a string' if prompt.source is None else 'a string or an assistant turn'}, "
                          f"got {type(value).__name__}", "not_an_answer")
    role_tag = spec.tags["role_tag"]
    if value.get(role_tag) not in (spec.tags["assistant_tag"], spec.tags["function_tag"]):
        raise RecordError(file, index, f"{where}.{role_tag}", f"expected an assistant turn, got {value.get(role_tag)!r}",
                          "not_an_answer")
    name, position = spec.columns["messages"], len(prompt.turns)
    try:  # the conversation rules (tool calls included) with this answer as the turn after the prompt
        messages = _turns({**prompt.source, name: [*prompt.turns, value]}, spec, file, index)["messages"]
    except RecordError as error:
        if error.field and error.field.startswith(f"{name}[{position}]"):
            error.field = where + error.field[len(f"{name}[{position}]"):]
        raise
    return messages[-1]


def _unpaired(record: dict, spec: FormatSpec, file: str, index: int) -> dict[str, Any]:
    """KTO: a conversation whose last assistant turn is the answer, and a boolean label."""
    tag_column = spec.columns["kto_tag"]
    label = lookup(record, tag_column)
    if label is None:
        raise RecordError(file, index, tag_column, "missing", "missing_field")
    if not isinstance(label, bool):
        raise RecordError(file, index, tag_column, f"expected true or false (desirable or not), got {label!r}",
                          "not_a_boolean")
    completion_column = spec.columns.get("completion")
    if completion_column:  # TRL's unpaired layout: the prompt and its completion apart
        prompt = _prompt(record, spec, file, index)
        completion = _answer(record, spec, "completion", prompt, file, index)
        return {"prompt": prompt.messages, "completion": completion, "label": label, "tools": prompt.tools}
    if spec.format == "alpaca":
        conversation = _alpaca(record, spec.columns, file, index)
    else:
        conversation = _turns(_flat(record, spec), spec, file, index)
    messages = conversation["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1], "label": label, "tools": conversation["tools"]}

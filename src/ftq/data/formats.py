"""Normalize alpaca, sharegpt and openai-messages records to one conversation schema:

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], "tools": str|None}

Every check raises a RecordError naming the field. Function calls become assistant turns (they are
trained on); observations become `tool` turns (context, not targets)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ftq.data.errors import RecordError

FORMATS = ("alpaca", "sharegpt", "openai")

DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools"},
}
DEFAULT_TAGS = {
    "sharegpt": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "observation_tag": "observation",
        "function_tag": "function_call",
        "system_tag": "system",
    },
    "openai": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": "function_call",
        "system_tag": "system",
    },
}
USER_SIDE = ("user", "tool")
ASSISTANT_SIDE = ("assistant",)


@dataclass
class FormatSpec:
    format: str
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, fmt: str, columns: dict | None = None, tags: dict | None = None, where: str = "") -> "FormatSpec":
        if fmt not in FORMATS:
            raise ValueError(f"{where}format '{fmt}': expected one of {', '.join(FORMATS)}")
        merged_columns = dict(DEFAULT_COLUMNS[fmt])
        for key, value in (columns or {}).items():
            if key not in merged_columns:
                raise ValueError(f"{where}columns.{key}: unknown for {fmt} (known: {', '.join(merged_columns)})")
            merged_columns[key] = value
        merged_tags = dict(DEFAULT_TAGS.get(fmt, {}))
        for key, value in (tags or {}).items():
            if key not in merged_tags:
                raise ValueError(f"{where}tags.{key}: unknown for {fmt} (known: {', '.join(merged_tags) or 'none'})")
            merged_tags[key] = value
        return cls(fmt, merged_columns, merged_tags)


def normalize(record: Any, spec: FormatSpec, file: str, index: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise RecordError(file, index, None, f"expected an object, got {type(record).__name__}", "not_an_object")
    if spec.format == "alpaca":
        return _alpaca(record, spec.columns, file, index)
    return _turns(record, spec, file, index)


def _error(file, index, name, message, reason):
    return RecordError(file, index, name, message, reason)


def _string(record: dict, name: str | None, file: str, index: int, required: bool, allow_empty: bool = False):
    if not name or name not in record or record[name] is None:
        if required:
            raise _error(file, index, name, "missing", "missing_field")
        return None
    value = record[name]
    if not isinstance(value, str):
        raise _error(file, index, name, f"expected a string, got {type(value).__name__}", "not_a_string")
    if required and not allow_empty and not value.strip():
        raise _error(file, index, name, "empty", "empty_field")
    return value


def _tools(record: dict, name: str | None, file: str, index: int) -> str | None:
    if not name or record.get(name) in (None, "", []):
        return None
    value = record[name]
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise _error(file, index, name, f"not valid JSON: {exc.msg}", "bad_tools") from exc
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    raise _error(file, index, name, f"expected JSON text or a list, got {type(value).__name__}", "bad_tools")


def _alpaca(record: dict, columns: dict[str, str], file: str, index: int) -> dict[str, Any]:
    prompt = _string(record, columns["prompt"], file, index, required=True)
    query = _string(record, columns["query"], file, index, required=False) or ""
    response = _string(record, columns["response"], file, index, required=True)
    system = _string(record, columns["system"], file, index, required=False)
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    history_name = columns["history"]
    history = record.get(history_name) if history_name else None
    if history not in (None, "", []):
        if not isinstance(history, list):
            raise _error(file, index, history_name, f"expected a list of [prompt, response] pairs, got {type(history).__name__}", "bad_history")
        for turn, pair in enumerate(history):
            where = f"{history_name}[{turn}]"
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise _error(file, index, where, "expected a [prompt, response] pair", "bad_history")
            for side, text in zip(("prompt", "response"), pair):
                if not isinstance(text, str):
                    raise _error(file, index, where, f"{side} is {type(text).__name__}, expected a string", "not_a_string")
                if not text.strip():
                    raise _error(file, index, where, f"{side} is empty", "empty_field")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{prompt}\n{query}" if query.strip() else prompt
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return {"messages": messages, "tools": None}


def _role_map(tags: dict[str, str]) -> dict[str, str]:
    return {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["observation_tag"]: "tool",
        tags["function_tag"]: "function_call",
        tags["system_tag"]: "system",
    }


def _turn_content(turn: dict, tags: dict, role: str, file: str, index: int, where: str) -> str:
    content_tag = tags["content_tag"]
    content = turn.get(content_tag)
    if content is None and role == "assistant" and turn.get("tool_calls"):
        return json.dumps(turn["tool_calls"], ensure_ascii=False)  # OpenAI assistant tool calls
    if content is None:
        raise _error(file, index, f"{where}.{content_tag}", "missing", "missing_field")
    if not isinstance(content, str):
        raise _error(file, index, f"{where}.{content_tag}", f"expected a string, got {type(content).__name__}", "not_a_string")
    if not content.strip():
        raise _error(file, index, f"{where}.{content_tag}", "empty", "empty_field")
    return content


def _turns(record: dict, spec: FormatSpec, file: str, index: int) -> dict[str, Any]:
    columns, tags = spec.columns, spec.tags
    name = columns["messages"]
    turns = record.get(name)
    if turns is None:
        raise _error(file, index, name, "missing", "missing_field")
    if not isinstance(turns, list):
        raise _error(file, index, name, f"expected a list of turns, got {type(turns).__name__}", "not_a_list")
    if not turns:
        raise _error(file, index, name, "empty conversation", "empty_conversation")
    roles = _role_map(tags)
    messages: list[dict[str, str]] = []
    system = _string(record, columns.get("system"), file, index, required=False)
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    for position, turn in enumerate(turns):
        where = f"{name}[{position}]"
        if not isinstance(turn, dict):
            raise _error(file, index, where, f"expected an object, got {type(turn).__name__}", "not_an_object")
        tag = turn.get(tags["role_tag"])
        if tag is None:
            raise _error(file, index, f"{where}.{tags['role_tag']}", "missing", "missing_field")
        role = roles.get(tag)
        if role is None:
            known = ", ".join(repr(k) for k in roles)
            raise _error(file, index, f"{where}.{tags['role_tag']}", f"unknown role {tag!r} (known: {known})", "unknown_role")
        if role == "system":
            if position != 0 or messages:
                raise _error(file, index, f"{where}.{tags['role_tag']}", "a system turn is only allowed first", "turn_order")
            messages.append({"role": "system", "content": _turn_content(turn, tags, role, file, index, where)})
            continue
        role = "assistant" if role == "function_call" else role
        content = _turn_content(turn, tags, role, file, index, where)
        expected = USER_SIDE if len([m for m in messages if m["role"] != "system"]) % 2 == 0 else ASSISTANT_SIDE
        if role not in expected:
            wanted = "a user or observation" if expected is USER_SIDE else "an assistant or function-call"
            raise _error(file, index, f"{where}.{tags['role_tag']}", f"turn out of order: expected {wanted} turn, got {tag!r}", "turn_order")
        messages.append({"role": role, "content": content})
    dialogue = [m for m in messages if m["role"] != "system"]
    if not dialogue:
        raise _error(file, index, name, "empty conversation (only a system turn)", "empty_conversation")
    if dialogue[-1]["role"] != "assistant":
        raise _error(file, index, name, "the last turn must be the assistant's", "turn_order")
    return {"messages": messages, "tools": _tools(record, columns.get("tools"), file, index)}

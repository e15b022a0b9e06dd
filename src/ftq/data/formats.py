"""Normalize alpaca, sharegpt and openai-messages records to one conversation schema:

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...],
     "tools": [OpenAI function schemas] | None}

Every check raises a RecordError naming the field. Function calls become assistant turns with OpenAI
`tool_calls` (they are trained on), observations `tool` turns with the `tool_call_id` of the call they
answer (context, not targets); see ftq.data.tools for the shape and the tool-data errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ftq.data.errors import RecordError
from ftq.data.tools import CallLedger, ToolDataError, normalize_tools, parse_call_turn

FORMATS = ("alpaca", "sharegpt", "openai", "openai_preference")

# preference columns (ftq.data.preference): chosen and rejected for `ranking: true` pairs, kto_tag (and for
# TRL's unpaired layout completion) for KTO's labelled answers; LLaMA-Factory's names
PREFERENCE_COLUMNS = {"chosen": "chosen", "rejected": "rejected", "kto_tag": None, "completion": None}
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history",
               **PREFERENCE_COLUMNS},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools", **PREFERENCE_COLUMNS},
    "openai": {"messages": "messages", "system": "system", "tools": "tools", **PREFERENCE_COLUMNS},
    # OpenAI's preference fine-tuning JSONL: always pairs
    "openai_preference": {"messages": "input.messages", "system": None, "tools": "input.tools",
                          **PREFERENCE_COLUMNS, "chosen": "preferred_output", "rejected": "non_preferred_output"},
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
DEFAULT_TAGS["openai_preference"] = DEFAULT_TAGS["openai"]


@dataclass
class FormatSpec:
    format: str
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False  # LLaMA-Factory's `ranking: true`: preference pairs (chosen, rejected)

    @classmethod
    def build(cls, fmt: str, columns: dict | None = None, tags: dict | None = None, where: str = "",
              ranking: bool = False) -> "FormatSpec":
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
        ranking = bool(ranking) or fmt == "openai_preference"
        if ranking and merged_columns["kto_tag"]:
            raise ValueError(f"{where}columns.kto_tag: a `ranking: true` dataset holds pairs; KTO's labelled "
                             "answers are a dataset of their own (no ranking)")
        return cls(fmt, merged_columns, merged_tags, ranking)


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


def _tools(record: dict, name: str | None, file: str, index: int) -> list[dict] | None:
    try:
        return normalize_tools(record.get(name) if name else None, name or "tools")
    except ToolDataError as exc:
        raise _error(file, index, exc.field, str(exc), exc.reason) from exc


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
    if role == "tool" and isinstance(content, (dict, list)):
        return json.dumps(content, ensure_ascii=False)  # a structured tool result
    if content is None:
        raise _error(file, index, f"{where}.{content_tag}", "missing", "missing_field")
    if not isinstance(content, str):
        raise _error(file, index, f"{where}.{content_tag}", f"expected a string, got {type(content).__name__}", "not_a_string")
    if not content.strip():
        raise _error(file, index, f"{where}.{content_tag}", "empty", "empty_field")
    return content


# what may follow each kind of turn; "calls" is an assistant turn that calls functions
FOLLOWS = {"user": (None, "assistant"), "assistant": ("user", "tool"), "calls": ("user", "tool"),
           "tool": ("calls", "tool")}


def _out_of_order(kind: str, previous: str | None, tag: str) -> str:
    if previous == "calls":
        return f"turn out of order: expected an observation turn after a function call, got {tag!r}"
    if kind in ("user", "tool") and previous in ("user", "tool"):
        return f"turn out of order: expected an assistant or function-call turn, got {tag!r}"
    return f"turn out of order: expected a user or observation turn, got {tag!r}"


def _message(turn: dict, role: str, tags: dict, ledger: CallLedger, file: str, index: int, where: str) -> list[dict]:
    """One source turn -> its normalized message(s); raises on bad tool data."""
    content_tag = tags["content_tag"]
    try:
        if role == "function_call":
            return [ledger.assistant_calls(parse_call_turn(turn.get(content_tag), f"{where}.{content_tag}"),
                                           f"{where}.{content_tag}")]
        if role == "assistant" and turn.get("tool_calls"):  # OpenAI: calls on the assistant message
            message = ledger.assistant_calls(parse_call_turn(turn["tool_calls"], f"{where}.tool_calls"),
                                             f"{where}.tool_calls")
            text = turn.get(content_tag)
            message["content"] = text if isinstance(text, str) else ""
            return [message]
        content = _turn_content(turn, tags, role, file, index, where)
        if role == "tool":
            call_id = turn.get("tool_call_id")
            return ledger.results(content, call_id if isinstance(call_id, str) else None, f"{where}.{tags['role_tag']}",
                                  one_turn_answers_all=call_id is None)
        return [{"role": role, "content": content}]
    except ToolDataError as exc:
        raise _error(file, index, exc.field, str(exc), exc.reason) from exc


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
    tools = _tools(record, columns.get("tools"), file, index)
    ledger = CallLedger(tools)
    messages: list[dict] = []
    system = _string(record, columns.get("system"), file, index, required=False)
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    previous: str | None = None
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
        kind = "calls" if role == "function_call" or (role == "assistant" and turn.get("tool_calls")) else role
        role_field = f"{where}.{tags['role_tag']}"
        if kind == "tool" and not ledger.pending:
            raise _error(file, index, role_field, "an observation with no function call before it",
                         "observation_without_call")
        if previous not in FOLLOWS[kind] or (kind != "tool" and previous == "calls"):
            raise _error(file, index, role_field, _out_of_order(kind, previous, tag), "turn_order")
        if kind != "tool" and ledger.pending:
            raise _error(file, index, role_field, f"{len(ledger.pending)} function call(s) have no result before "
                         f"this turn ({', '.join(ledger.pending)})", "turn_order")
        messages.extend(_message(turn, role, tags, ledger, file, index, where))
        previous = kind
    dialogue = [m for m in messages if m["role"] != "system"]
    if not dialogue:
        raise _error(file, index, name, "empty conversation (only a system turn)", "empty_conversation")
    if previous not in ("assistant", "calls"):
        raise _error(file, index, name, "the last turn must be the assistant's", "turn_order")
    return {"messages": messages, "tools": tools}

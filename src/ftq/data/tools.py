"""Tool calling in the one shape every part of ftq uses, OpenAI's:

    tools:     [{"type": "function", "function": {"name", "description", "parameters"}}]
    a call:    {"role": "assistant", "content": "", "tool_calls": [{"id", "type": "function",
                "function": {"name", "arguments": {...}}}]}
    a result:  {"role": "tool", "tool_call_id": "...", "content": "..."}

Arguments stay JSON objects (chat templates `tojson` them); the API boundary turns them into the JSON
text OpenAI sends. Rendering (`render`) is shared by prepare, evaluate and serve: a chat template that
renders tools and calls itself is used as is; otherwise ftq's fallback puts the tools into the system
prompt and the calls into the assistant turn as `<tool_call>{...}</tool_call>` (the Hermes/Qwen2.5
tags, so one parser reads what either path taught), and tool results into a user turn as
`<tool_response>...</tool_response>`."""

from __future__ import annotations

import json
import re
from typing import Any, Callable

NATIVE, FALLBACK = "chat_template", "ftq_fallback"

FALLBACK_PROMPT = (
    "You can call these functions:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with a JSON object inside <tool_call></tool_call> tags:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)

Renderer = Callable[[list, "list | None", bool], str]  # (messages, tools, add_generation_prompt) -> text


class ToolDataError(ValueError):
    """Bad tool data; `field` names where in the record, `reason` is the reject category."""

    def __init__(self, field: str, message: str, reason: str):
        super().__init__(message)
        self.field, self.reason = field, reason


# --- normalizing data -------------------------------------------------------------------------------

def normalize_tools(value: Any, field: str) -> list[dict] | None:
    """A tools field (JSON text or a list; OpenAI's nested shape or LLaMA-Factory's flat one) -> the
    OpenAI list, or None where there are none."""
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolDataError(field, f"not valid JSON: {exc.msg}", "bad_tools") from exc
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ToolDataError(field, f"expected a list of function schemas, got {type(value).__name__}", "bad_tools")
    tools, names = [], set()
    for position, item in enumerate(value):
        where = f"{field}[{position}]"
        if not isinstance(item, dict):
            raise ToolDataError(where, f"expected an object, got {type(item).__name__}", "bad_tools")
        function = item.get("function") if item.get("type") == "function" or "function" in item else item
        if not isinstance(function, dict):
            raise ToolDataError(f"{where}.function", "expected an object", "bad_tools")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ToolDataError(f"{where}.name", "missing function name", "bad_tools")
        if name in names:
            raise ToolDataError(f"{where}.name", f"function {name!r} is declared twice", "bad_tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolDataError(f"{where}.parameters", "expected a JSON schema object", "bad_tools")
        names.add(name)
        declared = {"name": name, "description": str(function.get("description") or ""), "parameters": parameters}
        tools.append({"type": "function", "function": declared})
    return tools


def tool_names(tools: list[dict] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or []]


def _arguments(value: Any, field: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolDataError(field, f"arguments are not JSON: {exc.msg}", "bad_tool_arguments") from exc
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ToolDataError(field, f"arguments must be a JSON object, got {type(value).__name__}", "bad_tool_arguments")
    return value


def parse_call_turn(value: Any, field: str) -> list[dict]:
    """A function-call turn's value ({"name", "arguments"} or a list of them, as JSON text or objects;
    OpenAI's {"type": "function", "function": {...}} items too) -> [{"name", "arguments"}]."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolDataError(field, f"a function call must be JSON: {exc.msg}", "bad_tool_call") from exc
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ToolDataError(field, "an empty list of function calls", "bad_tool_call")
    calls = []
    for position, item in enumerate(items):
        where = f"{field}[{position}]" if isinstance(value, list) else field
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = {**item["function"], "id": item.get("id")}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise ToolDataError(where, "a function call needs a \"name\"", "bad_tool_call")
        arguments = item.get("arguments", item.get("parameters"))
        calls.append({"name": item["name"], "arguments": _arguments(arguments, f"{where}.arguments"),
                      "id": item.get("id") if isinstance(item.get("id"), str) else None})
    return calls


class CallLedger:
    """Gives calls their ids in order and pairs each tool result with the call it answers."""

    def __init__(self, tools: list[dict] | None):
        self.declared = set(tool_names(tools))
        self.count = 0
        self.pending: list[str] = []

    def assistant_calls(self, calls: list[dict], field: str) -> dict:
        if self.pending:
            raise ToolDataError(field, f"a function call while {len(self.pending)} earlier call(s) have no result",
                                "turn_order")
        tool_calls = []
        for call in calls:
            if call["name"] not in self.declared:
                known = ", ".join(sorted(self.declared)) or "none declared"
                raise ToolDataError(field, f"calls undeclared function {call['name']!r} (tools: {known})",
                                    "undeclared_tool")
            ident = call["id"] or f"call_{self.count}"
            self.count += 1
            tool_calls.append({"id": ident, "type": "function",
                               "function": {"name": call["name"], "arguments": call["arguments"]}})
        self.pending = [c["id"] for c in tool_calls]
        return {"role": "assistant", "content": "", "tool_calls": tool_calls}

    def results(self, content: str, call_id: Any, field: str, one_turn_answers_all: bool) -> list[dict]:
        """The tool message(s) for one observation turn. In ShareGPT one observation answers the whole call
        turn before it (a JSON list with one result per call is split); in OpenAI each names its call."""
        if not self.pending:
            raise ToolDataError(field, "an observation with no function call before it", "observation_without_call")
        if call_id is not None:
            if call_id not in self.pending:
                raise ToolDataError(field, f"tool_call_id {call_id!r} answers no open call "
                                           f"(open: {', '.join(self.pending)})", "observation_without_call")
            self.pending.remove(call_id)
            return [{"role": "tool", "tool_call_id": call_id, "content": content}]
        if not one_turn_answers_all or len(self.pending) == 1:
            return [{"role": "tool", "tool_call_id": self.pending.pop(0), "content": content}]
        parts = _split_results(content, len(self.pending))
        answered, self.pending = self.pending, []
        if parts is None:  # one result text for several calls: it answers the first; the rest see it too
            return [{"role": "tool", "tool_call_id": answered[0], "content": content}]
        return [{"role": "tool", "tool_call_id": i, "content": p} for i, p in zip(answered, parts)]


def _split_results(content: str, count: int) -> list[str] | None:
    try:
        value = json.loads(content)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == count:
        return [v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in value]
    return None


# --- rendering --------------------------------------------------------------------------------------

PROBE_TOOL = {"type": "function", "function": {
    "name": "ftq_probe_function", "description": "ftq_probe_description",
    "parameters": {"type": "object", "properties": {"ftq_probe_argument": {"type": "string"}},
                   "required": ["ftq_probe_argument"]}}}
PROBE_MESSAGES = [
    {"role": "user", "content": "ftq_probe_question"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_0", "type": "function", "function": {
        "name": "ftq_probe_function", "arguments": {"ftq_probe_argument": "ftq_probe_value"}}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "ftq_probe_result"},
    {"role": "assistant", "content": "ftq_probe_answer"},
]
PROBE_MARKERS = ("ftq_probe_description", "ftq_probe_argument", "ftq_probe_value", "ftq_probe_result",
                 "ftq_probe_answer")


def renders_tools(render: Renderer) -> bool:
    """Whether a chat template shows the model its tools, its calls and their results: render a probe
    conversation and look for every marker in the text."""
    try:
        text = render(PROBE_MESSAGES, [PROBE_TOOL], False)
    except Exception:  # a template that refuses tool messages or tool_calls does not support them
        return False
    return all(marker in text for marker in PROBE_MARKERS)


def rendering(render: Renderer) -> str:
    return NATIVE if renders_tools(render) else FALLBACK


def call_text(calls: list[dict]) -> str:
    return "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                                  ensure_ascii=False) + "\n</tool_call>" for c in calls)


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Plain system/user/assistant messages any chat template renders: tools in the system prompt,
    calls as <tool_call> JSON in the assistant turn, results in a user turn."""
    plain: list[dict] = []
    if tools:
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        prompt = FALLBACK_PROMPT.format(tools=listed)
        if messages and messages[0]["role"] == "system":
            prompt = messages[0]["content"].rstrip() + "\n\n" + prompt
            messages = messages[1:]
        plain.append({"role": "system", "content": prompt})
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if plain and plain[-1].get("tool_results"):
                plain[-1]["content"] += "\n" + block
            else:
                plain.append({"role": "user", "content": block, "tool_results": True})
        elif message.get("tool_calls"):
            text = (message.get("content") or "").strip()
            plain.append({"role": "assistant", "content": (text + "\n" if text else "") + call_text(message["tool_calls"])})
        else:
            plain.append({"role": message["role"], "content": message.get("content") or ""})
    for message in plain:
        message.pop("tool_results", None)
    return plain


def for_template(messages: list[dict], tools: list[dict] | None, mode: str) -> tuple[list[dict], list[dict] | None]:
    """The (messages, tools) to hand a chat template under `mode` (NATIVE or FALLBACK)."""
    has_tool_turns = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if mode == NATIVE or not (tools or has_tool_turns):
        return messages, tools
    return fallback_messages(messages, tools), None


def render(render_template: Renderer, messages: list[dict], tools: list[dict] | None, mode: str,
           add_generation_prompt: bool) -> str:
    shown, shown_tools = for_template(messages, tools, mode)
    return render_template(shown, shown_tools, add_generation_prompt)


def tokenizer_renderer(tokenizer) -> Renderer:
    return lambda messages, tools, generation: tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation)


def template_renderer(template: str, special_tokens: dict | None = None) -> Renderer:
    """A renderer from a template's text alone (a GGUF's tokenizer.chat_template), as transformers renders it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def rendered(messages, tools, generation):
        texts, _ = render_jinja_template([messages], tools=tools, chat_template=template,
                                         add_generation_prompt=generation, **tokens)
        return texts[0]

    return rendered


# --- parsing a model's answer -----------------------------------------------------------------------

TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _call_of(value: Any) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return {"name": value["name"], "arguments": arguments} if isinstance(arguments, dict) else None


def parse_calls(text: str) -> tuple[str, list[dict]]:
    """A model's answer -> (the text before any call, [{"name", "arguments"}]). Reads <tool_call> blocks
    (either rendering path teaches them) and, for templates such as Llama 3.1's, an answer that is one
    bare JSON call. A block that is not a JSON call makes the whole answer text: no call is invented."""
    start = text.find("<tool_call>")
    if start >= 0:
        calls = []
        for block in TAGGED.findall(text[start:]):
            try:
                call = _call_of(json.loads(block))
            except ValueError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return text[:start].strip(), calls
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            call = _call_of(json.loads(stripped))
        except ValueError:
            call = None
        if call is not None:
            return "", [call]
    return text, []


def openai_tool_calls(calls: list[dict], prefix: str = "call") -> list[dict]:
    """Parsed calls -> the API's tool_calls, arguments as JSON text."""
    import uuid

    return [{"id": f"{prefix}_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]

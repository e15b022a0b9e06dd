"""Tool calling on `/v1/chat/completions`: the request's tools and messages are rendered with the served
model's chat template exactly as prepare rendered training data (ftq.data.tools: the template's own tool
rendering where it has one, ftq's fallback otherwise; transformers' Jinja renderer either way), and the
answer is parsed back into OpenAI `tool_calls`.

`tool_choice`: "auto" (the default with tools) lets the model answer or call; "none" renders no tools
and parses nothing; "required" or a named function starts the answer with the call's opening
(`<tool_call>` and, for a named function, its name), which the parsed answer includes. Forcing needs the
model's calls to be `<tool_call>` blocks (ftq's fallback, Hermes/Qwen-style templates).

A call is returned only if every function it names is in the request's `tools`; otherwise the answer is
returned as the model wrote it, as content with a plain answer's finish_reason. That is what the answer is when
it does not parse as a call either: the model's text, never a call to a function the client did not
offer (which a client could dispatch without looking). It is not the client's fault (no 4xx), and
retrying would not help (no 5xx). llama-server reaches the same guarantee by constraining generation to
the tools' names with a grammar.

Rendering a prompt is pure Python (Jinja) over a body of up to the size limit: it runs in a worker
thread (`ToolTemplate.render`), not on the event loop that serves every other request."""

from __future__ import annotations

import json
from dataclasses import dataclass

import anyio

from ftq.data import tools
from ftq.openai.schema import RequestError

OPEN = "<tool_call>"


@dataclass
class ToolTemplate:
    """How one served model renders tools; probed once from its chat template."""
    render_template: tools.Renderer
    rendering: str  # tools.NATIVE | tools.FALLBACK
    tagged_calls: bool  # calls are <tool_call> blocks (forcing a call is possible)

    @classmethod
    def probe(cls, info: dict) -> "ToolTemplate":
        template = info.get("chat_template")
        if not template:
            raise RequestError("tools: the served model has no chat template to render them with")
        renderer = tools.template_renderer(template, {"bos_token": info.get("bos_token"),
                                                      "eos_token": info.get("eos_token")})
        rendering = tools.rendering(renderer)
        tagged = rendering == tools.FALLBACK or OPEN in renderer(tools.PROBE_MESSAGES, [tools.PROBE_TOOL], False)
        return cls(renderer, rendering, tagged)

    @classmethod
    async def probe_off_loop(cls, info: dict) -> "ToolTemplate":
        return await anyio.to_thread.run_sync(cls.probe, info)

    async def render(self, messages: list[dict], shown_tools: list[dict] | None,
                     forced: str | None) -> tuple[str, str]:
        """`prompt`, in a worker thread: the event loop goes on serving other requests meanwhile."""
        return await anyio.to_thread.run_sync(self.prompt, messages, shown_tools, forced)

    def prompt(self, messages: list[dict], shown_tools: list[dict] | None, forced: str | None) -> tuple[str, str]:
        """The prompt text and the answer's forced opening ("" when the model chooses)."""
        text = tools.render(self.render_template, messages, shown_tools, self.rendering, True)
        if forced is None:
            return text, ""
        if not self.tagged_calls:
            raise RequestError("tool_choice: this model's chat template does not write calls as <tool_call> blocks, "
                               "so a call cannot be forced; use \"auto\"")
        # each opening ends where BPE vocabularies split JSON (after `": "` and after `"arguments":`), so the
        # model continues from the tokens it was trained on
        opening = OPEN + "\n" + ('{"name": ' + json.dumps(forced) + ', "arguments":' if forced else '{"name": "')
        return text + opening, opening


def offered_calls(text: str, names: frozenset[str]) -> tuple[str, list[dict]]:
    """`tools.parse_calls`, keeping the calls only where every one names a function in `names`."""
    before, calls = tools.parse_calls(text)
    if any(call["name"] not in names for call in calls):
        return text, []
    return before, calls


def message(text: str, names: frozenset[str]) -> tuple[dict, str | None]:
    """A finished answer -> the assistant message, and "tool_calls" as finish reason where it called."""
    before, calls = offered_calls(text, names)
    if not calls:
        return {"role": "assistant", "content": text}, None
    return {"role": "assistant", "content": before or None, "tool_calls": tools.openai_tool_calls(calls)}, "tool_calls"


@dataclass(frozen=True)
class Calling:
    """How one request's answer is read back: the forced opening it starts with, and the tools it offered."""
    opening: str
    names: frozenset[str]

    @classmethod
    def of(cls, opening: str, shown_tools: list[dict]) -> "Calling":
        return cls(opening, frozenset(t["function"]["name"] for t in shown_tools))

    def message(self, text: str) -> tuple[dict, str | None]:
        return message(self.opening + text, self.names)

    def hold(self) -> "StreamHold":
        return StreamHold(self.opening, self.names)


class StreamHold:
    """Streams text while it cannot be a call; from `<tool_call>` (or a partial one at the end, or an
    answer that opens with a bare JSON object) it holds the rest back until the answer is whole."""

    def __init__(self, opening: str, names: frozenset[str]):
        self.names = names
        self.text = opening
        self.sent = 0
        self.holding = bool(opening)

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.holding:
            return ""
        start = self.text.find(OPEN, self.sent)
        if start >= 0 or self.text.lstrip().startswith("{"):
            self.holding = True
            start = self.sent if start < 0 else start
            out, self.sent = self.text[self.sent:start], start
            return out
        safe = len(self.text)
        for size in range(min(len(OPEN) - 1, len(self.text)), 0, -1):  # a partial "<tool_" at the end waits
            if OPEN.startswith(self.text[-size:]):
                safe = len(self.text) - size
                break
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """The text still to send (when the held part was no call) and the calls, if any."""
        before, calls = offered_calls(self.text, self.names)
        if calls:
            return "", tools.openai_tool_calls(calls)
        return self.text[self.sent:], []

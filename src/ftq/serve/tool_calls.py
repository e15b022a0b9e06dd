"""Tool calling on `/v1/chat/completions`: the request's tools and messages are rendered with the served
model's chat template exactly as prepare rendered training data (ftq.data.tools: the template's own tool
rendering where it has one, ftq's fallback otherwise; transformers' Jinja renderer either way), and the
answer is parsed back into OpenAI `tool_calls`.

`tool_choice`: "auto" (the default with tools) lets the model answer or call; "none" renders no tools
and parses nothing; "required" or a named function starts the answer with the call's opening
(`<tool_call>` and, for a named function, its name), which the parsed answer includes. Forcing needs the
model's calls to be `<tool_call>` blocks (ftq's fallback, Hermes/Qwen-style templates)."""

from __future__ import annotations

import json
from dataclasses import dataclass

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


def message(text: str) -> tuple[dict, str | None]:
    """A finished answer -> the assistant message, and "tool_calls" as finish reason where it called."""
    before, calls = tools.parse_calls(text)
    if not calls:
        return {"role": "assistant", "content": text}, None
    return {"role": "assistant", "content": before or None, "tool_calls": tools.openai_tool_calls(calls)}, "tool_calls"


class StreamHold:
    """Streams text while it cannot be a call; from `<tool_call>` (or a partial one at the end, or an
    answer that opens with a bare JSON object) it holds the rest back until the answer is whole."""

    def __init__(self, opening: str):
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
        before, calls = tools.parse_calls(self.text)
        if calls:
            return "", tools.openai_tool_calls(calls)
        return self.text[self.sent:], []

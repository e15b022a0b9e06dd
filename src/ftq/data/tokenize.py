"""Tokenize conversations with the base model's own chat template; labels only on assistant turns.

Assistant spans are found by rendering growing prefixes of the conversation: the text between
render(turns[:i], add_generation_prompt=True) and render(turns[:i+1]) is turn i's target, including
the template's end-of-turn token so the model learns to stop. Tokens are then labelled by their
character offsets, which works for any template that renders prefixes as prefixes.

Conversations with tools are rendered through ftq.data.tools (the template's own tool rendering, or
ftq's fallback), and every tokenized example is checked to still show each of its tools."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ftq.data import tools as tool_format

IGNORE_INDEX = -100


class TemplateError(ValueError):
    pass


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    missing_tools: list[str] = field(default_factory=list)  # tool names the kept tokens do not show

    @property
    def target_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer, messages, tools, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tool_rendering(tokenizer) -> str:
    """tools.NATIVE where the tokenizer's chat template renders tools and calls itself, else tools.FALLBACK."""
    return tool_format.rendering(tool_format.tokenizer_renderer(tokenizer))


def assistant_spans(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans [start, end) of every assistant turn."""
    text = _render(tokenizer, messages, tools, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], tools, True)
        upto = _render(tokenizer, messages[: i + 1], tools, False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise TemplateError(
                "the chat template does not render conversation prefixes as prefixes of the full text, "
                "so assistant turns cannot be located for labelling"
            )
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokenize_conversation(tokenizer, conversation: dict[str, Any], max_length: int, truncation: str = "right",
                          rendering: str | None = None):
    """Tokenized example, or None when it must be dropped (too long under `drop`, or no target left).
    `rendering` (tool_rendering's answer) is probed from the tokenizer when not given."""
    tools = conversation.get("tools") or None
    if rendering is None and tools:
        rendering = tool_rendering(tokenizer)
    messages, shown_tools = tool_format.for_template(conversation["messages"], tools, rendering)
    text, spans = assistant_spans(tokenizer, messages, shown_tools)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for position, (start, _end) in enumerate(encoded["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[position] = input_ids[position]
    truncated = len(input_ids) > max_length
    if truncated:
        if truncation == "drop":
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    example = Tokenized(input_ids, labels, truncated)
    if tools:
        shown = tokenizer.decode(input_ids, skip_special_tokens=False)
        example.missing_tools = [name for name in tool_format.tool_names(tools) if name not in shown]
    return example if example.target_tokens else None


@dataclass
class PreferenceTokens:
    """A preference record in tokens: the prompt once (every answer follows exactly these ids) and each
    answer's own ids, `truncated` naming the answers cut to fit max_length."""
    prompt_ids: list[int]
    answers: dict[str, list[int]]  # chosen and rejected (a pair), or completion (KTO)
    truncated: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(ids) for ids in self.answers.values())


def answer_sides(record: dict[str, Any]) -> tuple[str, ...]:
    return ("chosen", "rejected") if "chosen" in record else ("completion",)


def tokenize_preference(tokenizer, record: dict[str, Any], max_length: int, truncation: str = "right",
                        rendering: str | None = None) -> PreferenceTokens | None:
    """Prompt and answers tokenized apart from one rendering, so both answers of a pair share the prompt's
    tokens exactly; an answer holds the template's end-of-turn. Where prompt + the longer answer exceed
    max_length, `right` cuts each answer that does not fit to the room left (and says which) and `drop`
    drops the record; a prompt that leaves no room is dropped either way (None)."""
    tools = record.get("tools") or None
    if rendering is None and tools:
        rendering = tool_rendering(tokenizer)
    prompt_text, texts = None, {}
    for side in answer_sides(record):
        messages, shown_tools = tool_format.for_template([*record["prompt"], record[side]], tools, rendering)
        prompt = _render(tokenizer, messages[:-1], shown_tools, True)
        full = _render(tokenizer, messages, shown_tools, False)
        if not full.startswith(prompt) or (prompt_text is not None and prompt != prompt_text):
            raise TemplateError("the chat template does not render the prompt as a prefix of prompt + answer, "
                                "so the answers of a preference record cannot share its prompt tokens")
        prompt_text, texts[side] = prompt, full[len(prompt):]
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    answers = {side: list(tokenizer(text, add_special_tokens=False)["input_ids"]) for side, text in texts.items()}
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    cut = [side for side, ids in answers.items() if len(ids) > room]
    if cut and truncation == "drop":
        return None
    return PreferenceTokens(prompt_ids, {side: ids[:room] for side, ids in answers.items()}, cut)

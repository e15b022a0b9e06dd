"""Request models, validation and limits for the OpenAI-compatible endpoints, and the response shapes.
Requests are validated strictly: unknown fields, values out of range, too many tokens or too long a
prompt get a 400 with a message in OpenAI's error shape."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_DEPTH = 32  # JSON nesting a request may have: deep enough for any tool's parameter schema
# vLLM's range for seeds (a signed 64-bit integer); larger ones would fail to encode for the engine
Seed = Annotated[int, Field(ge=-2 ** 63, le=2 ** 63 - 1)]
TokenId = Annotated[int, Field(ge=0, lt=2 ** 31)]  # llama.cpp's token ids are 32-bit signed


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSchema


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class GenerationRequest(BaseModel):
    """What chat and text completion requests share: the model, sampling, stop strings, streaming."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    user: str | None = None
    # generate exactly max_tokens tokens (as llama-server and vLLM accept it): benchmarks fix the answer length
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)  # accepted for client compatibility; only 0 supported
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise RequestError("stop: at most 4 sequences")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; the model decides how many calls it writes

    def tool_list(self) -> list[dict] | None:
        """The tools the model is shown: none under tool_choice "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [{"type": "function", "function": {"name": t.function.name, "description": t.function.description or "",
                                                  "parameters": t.function.parameters or {"type": "object", "properties": {}}}}
                for t in self.tools]

    def forced_function(self) -> str | None:
        """The function tool_choice names, "" for "required", None where the model chooses."""
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in {t.function.name for t in self.tools or []}:
                raise RequestError(f"tool_choice: function {self.tool_choice.function.name!r} is not in tools")
            return self.tool_choice.function.name
        if self.tool_choice == "required":
            if not self.tools:
                raise RequestError("tool_choice: \"required\" needs tools")
            return ""
        return None

    def conversation(self) -> list[dict]:
        """The messages in ftq's shape (ftq.data.tools): call arguments as JSON objects, checked here."""
        messages = []
        for number, message in enumerate(self.messages):
            if message.role == "tool" and not message.tool_call_id:
                raise RequestError(f"messages.{number}.tool_call_id: a tool message must name the call it answers")
            if message.content is None and not message.tool_calls:
                raise RequestError(f"messages.{number}.content: missing")
            entry = {"role": message.role, "content": message.content or ""}
            if message.tool_calls:
                entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments, number, position)}}
                    for position, c in enumerate(message.tool_calls)]
            if message.tool_call_id:
                entry["tool_call_id"] = message.tool_call_id
            messages.append(entry)
        return messages


def _arguments(text: str, number: int, position: int) -> dict:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise RequestError(f"messages.{number}.tool_calls.{position}.function.arguments: not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RequestError(f"messages.{number}.tool_calls.{position}.function.arguments: must be a JSON object")
    return value


class CompletionRequest(GenerationRequest):
    # a text, a batch of texts, token ids, or a batch of token-id lists (what lm-eval sends)
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise RequestError("prompt: must not be empty")
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def needs_scoring(self) -> bool:
        return self.echo or self.logprobs is not None or not isinstance(self.prompt, str)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[TokenId]


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Limits:
    """What one request may cost. A batch of prompts counts as a whole: its prompts together against
    `max_batch_tokens`, each one against `max_prompt_tokens`."""
    max_tokens: int = 1024  # the most a request may ask for (and the default when it asks for none: 256)
    default_max_tokens: int = 256
    max_prompt_tokens: int = 3072
    max_batch_prompts: int = 32
    max_batch_tokens: int = 16384  # prompt + completion tokens of every prompt in one request
    max_body_bytes: int = 2 * 1024 * 1024  # larger bodies get 413 before they are read


def parse(model_cls, body: bytes):
    # orjson rather than json: it refuses lone surrogates (which no engine could be sent) and stops at a
    # nesting depth instead of raising RecursionError
    try:
        payload = orjson.loads(body or b"")
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc
    if depth(payload) > MAX_DEPTH:
        raise RequestError(f"request body is nested deeper than {MAX_DEPTH} levels")
    return validate(model_cls, payload)


def depth(value) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def validate(model_cls, payload):
    if not isinstance(payload, dict):
        raise RequestError("request body must be a JSON object")
    try:
        return model_cls.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise RequestError(f"{where}: {first['msg']}") from exc


def budget(limits: Limits, asked: int | None) -> int:
    asked = asked or min(limits.default_max_tokens, limits.max_tokens)
    if asked > limits.max_tokens:
        raise RequestError(f"max_tokens: {asked} is above this server's limit of {limits.max_tokens}")
    return asked


def check_prompt(limits: Limits, prompt_tokens: int, max_tokens: int, context: int, where: str = "prompt") -> None:
    allowed = min(limits.max_prompt_tokens, context - max_tokens)
    if prompt_tokens > allowed:
        raise RequestError(f"{where} is {prompt_tokens} tokens, above this server's limit of {allowed} "
                           f"(max_prompt_tokens {limits.max_prompt_tokens}, context {context} - max_tokens {max_tokens})")


def check_batch(limits: Limits, prompt_lengths: list[int], max_tokens: int) -> None:
    if len(prompt_lengths) > limits.max_batch_prompts:
        raise RequestError(f"prompt: {len(prompt_lengths)} prompts in one request, above this server's limit of "
                           f"{limits.max_batch_prompts}")
    total = sum(prompt_lengths) + len(prompt_lengths) * max_tokens
    if total > limits.max_batch_tokens:
        raise RequestError(f"prompt: this batch needs {total} tokens (prompts + max_tokens for each), above this "
                           f"server's limit of {limits.max_batch_tokens} per request")


def chat_arguments(body: ChatRequest, limits: Limits) -> dict:
    """A validated chat request -> the keyword arguments of a runtime's `stream_chat` (plain chat: tool
    calling is `ftq serve`'s)."""
    if body.tools or any(m.role == "tool" or m.tool_calls for m in body.messages):
        raise RequestError("tools: tool calling is served by `ftq serve`, not by this flavor")
    messages = [{"role": m["role"], "content": m["content"]} for m in body.conversation()]
    return {"messages": messages, "max_new_tokens": budget(limits, body.max_completion_tokens or body.max_tokens),
            "temperature": body.temperature, "top_p": body.top_p, "stop": body.stop_list()}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(kind: str, ident: str, model: str, text: str, prompt_tokens: int, completion_tokens: int,
                        max_tokens: int, finish: str | None = None) -> dict:
    """OpenAI's chat.completion or text_completion object for one finished answer."""
    finish = finish or ("length" if completion_tokens >= max_tokens else "stop")
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if kind == "chat.completion" else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


@dataclass
class Chunks:
    """The server-sent events of one streamed answer, in OpenAI's chunk shape."""

    ident: str
    kind: str  # "chat.completion" or "text_completion"
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def event(self, choice: dict | None, extra: dict | None = None) -> bytes:
        payload = {"id": self.ident, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": [choice] if choice else []}
        return b"data: " + orjson.dumps({**payload, **(extra or {})}) + b"\n\n"

    def role(self) -> bytes:
        """A chat stream's first event: the assistant's turn, with no text yet."""
        return self.event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def text(self, text: str, finish: str | None = None) -> bytes:
        if self.chat:
            return self.event({"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish})
        return self.event({"index": 0, "text": text, "finish_reason": finish, "logprobs": None})

    def tool_calls(self, calls: list[dict]) -> bytes:
        return self.event({"index": 0, "finish_reason": None, "delta": {"tool_calls": [
            {"index": i, **call} for i, call in enumerate(calls)]}})

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self.event(None, {"usage": usage(prompt_tokens, completion_tokens)})

    @staticmethod
    def error(error: dict) -> bytes:
        """A failure after the status line was sent: the stream is the only place left to say it."""
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def error_body(exc: RequestError) -> dict:
    return {"error": {"message": str(exc), "type": exc.kind, "code": exc.status}}

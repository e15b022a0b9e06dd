"""The OpenAI-compatible server: GET /v1/models, POST /v1/chat/completions (server-sent events when
`stream` is true), POST /v1/completions (also with `echo`/`logprobs` and token-id prompts, exact from
the runtime's logits), vLLM's /tokenizer_info, /tokenize and /detokenize, GET /health and the web chat page.

One model, one runtime; requests take turns on it (a lock), so concurrent clients queue instead of
failing. Requests are validated strictly: unknown fields, values out of range, too many tokens or too
long a prompt get a 400 with a message in OpenAI's error shape."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ftq.registry.resolve import Resolved, fetch, lookup, resolve

log = logging.getLogger(__name__)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)  # accepted for client compatibility; only 0 supported
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise ValueError("stop: at most 4 sequences")
        return stops


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    # a text, a batch of texts, token ids, or a batch of token-id lists (what lm-eval sends)
    prompt: str | list[str] | list[int] | list[list[int]]
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
    tokens: list[int]


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass
class Limits:
    max_tokens: int = 1024  # the most a request may ask for (and the default when it asks for none: 256)
    default_max_tokens: int = 256
    max_prompt_tokens: int = 3072


@dataclass
class Served:
    resolved: Resolved
    runtime: Any
    loaded_at: float = field(default_factory=time.time)


class ModelHost:
    """The served model, swapped in place when `--watch` sees the alias move."""

    def __init__(self, reference: str, params: dict | None = None, threads: int | None = None, n_ctx: int = 4096,
                 loaded: Served | None = None):
        self.reference = reference
        self.params = params
        self.threads = threads
        self.n_ctx = n_ctx
        self.lock = threading.Lock()
        # `loaded`: a model already in memory (the evaluate stage serves its candidate to lm-eval)
        self.served = loaded or self._load(resolve(reference, params))

    def _load(self, resolved: Resolved) -> Served:
        from ftq.runtimes import open_model

        log.info("loading %s (%s)", resolved.path, resolved.reference)
        runtime = open_model(resolved.path, threads=self.threads, n_ctx=self.n_ctx)
        runtime.chat([{"role": "user", "content": "Hi"}], max_new_tokens=1)  # load now, not on the first request
        return Served(resolved, runtime)

    def reload_if_moved(self) -> bool:
        if self.served.resolved.version is None:  # a local path: nothing to follow
            return False
        found = lookup(self.reference, self.params)  # one registry call; download and verify only on a move
        if found.version == self.served.resolved.version:
            return False
        resolved = fetch(found, self.params)
        new = self._load(resolved)
        with self.lock:
            old, self.served = self.served, new
        old.runtime.close()
        log.info("now serving %s version %s", resolved.name, resolved.version)
        return True

    def watch(self, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            try:
                self.reload_if_moved()
            except Exception as exc:  # keep serving the current model if the registry is unreachable
                log.warning("watch: %s", exc)

    @property
    def model_id(self) -> str:
        return self.served.resolved.name

    def health(self) -> dict:
        resolved = self.served.resolved
        from ftq.runtimes import artifact_format

        return {"status": "ok", "model": resolved.name, "version": resolved.version, "alias": resolved.alias,
                "reference": resolved.reference, "sha256": resolved.sha256, "path": str(resolved.path),
                "format": artifact_format(resolved.path),
                "runtime": self.served.runtime.kind, "loaded_at": self.served.loaded_at}


def parse(model_cls, body: bytes):
    try:
        payload = json.loads(body or b"")
    except ValueError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc
    return validate(model_cls, payload)


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


def chat_arguments(body: ChatRequest, limits: Limits) -> dict:
    """A validated chat request -> the keyword arguments of a runtime's `stream_chat`."""
    messages = [m.model_dump(exclude_none=True, exclude={"name"}) for m in body.messages]
    return {"messages": messages, "max_new_tokens": budget(limits, body.max_completion_tokens or body.max_tokens),
            "temperature": body.temperature, "top_p": body.top_p, "stop": body.stop_list()}


def completion_response(kind: str, ident: str, model: str, text: str, prompt_tokens: int, completion_tokens: int,
                        max_tokens: int) -> dict:
    """OpenAI's chat.completion or text_completion object for one finished answer."""
    finish = "length" if completion_tokens >= max_tokens else "stop"
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
              if kind == "chat.completion" else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
    return {"id": ident, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage}


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"


def create_app(host: ModelHost, api_key: str | None = None, limits: Limits | None = None):
    from ftq.serve.page import PAGE

    limits = limits or Limits()
    app = FastAPI(title="ftq serve", docs_url=None, redoc_url=None)

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc), "type": exc.kind, "code": exc.status}}, status_code=exc.status)

    def authorize(request: Request) -> None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise RequestError("missing or wrong API key (Authorization: Bearer ...)", 401, "authentication_error")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return (PAGE.replace("__MODEL__", host.model_id).replace("__NEEDS_KEY__", "true" if api_key else "false")
                .replace("__MAX_TOKENS__", str(min(512, limits.max_tokens))))

    @app.get("/health")
    def health():
        return host.health()

    @app.get("/v1/models")
    def models(request: Request):
        try:
            authorize(request)
        except RequestError as exc:
            return error(exc)
        served = host.served
        return {"object": "list", "data": [{"id": host.model_id, "object": "model", "created": int(served.loaded_at),
                                            "owned_by": "ftq"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            authorize(request)
            body = parse(ChatRequest, await request.body())
            arguments = chat_arguments(body, limits)
        except (RequestError, ValueError) as exc:
            return error(exc if isinstance(exc, RequestError) else RequestError(str(exc)))
        return await respond(body, "chat.completion", lambda rt: rt.stream_chat(**arguments),
                             lambda rt: rt.prompt_tokens(arguments["messages"]), arguments["max_new_tokens"])

    @app.post("/v1/completions")
    async def completions(request: Request):
        from starlette.concurrency import run_in_threadpool

        try:
            authorize(request)
            body = parse(CompletionRequest, await request.body())
            max_tokens = budget(limits, body.max_tokens)
            stops = body.stop_list()
            if body.needs_scoring():
                if body.stream:
                    raise RequestError("stream: not supported with echo, logprobs or token-id/batched prompts")
                return await run_in_threadpool(scored_completions, body, max_tokens, stops)
        except (RequestError, ValueError) as exc:
            return error(exc if isinstance(exc, RequestError) else RequestError(str(exc)))
        return await respond(body, "text_completion", lambda rt: rt.stream_text(
            body.prompt, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stops),
            lambda rt: rt.count_tokens(body.prompt), max_tokens)

    def scored_completions(body: CompletionRequest, max_tokens: int, stops: list[str]) -> dict:
        from ftq.serve.scoring import complete, logprobs_payload

        choices, prompt_total, completion_total = [], 0, 0
        with host.lock:
            runtime = host.served.runtime
            vocab = runtime.tokenizer_info()["vocab_size"]
            for index, prompt in enumerate(body.prompts()):
                ids = runtime.tokenize(prompt, add_special=True) if isinstance(prompt, str) else prompt
                if not ids:
                    raise RequestError(f"prompt[{index}]: no tokens")
                if any(t < 0 or t >= vocab for t in ids):
                    raise RequestError(f"prompt[{index}]: token ids must be in [0, {vocab})")
                if len(ids) > limits.max_prompt_tokens or len(ids) + max_tokens > runtime.context_length:
                    raise RequestError(f"prompt[{index}] is {len(ids)} tokens: above this server's limit of "
                                       f"{min(limits.max_prompt_tokens, runtime.context_length - max_tokens)}")
                done = complete(runtime, ids, max_tokens, body.temperature, body.top_p, stops, body.logprobs or 0,
                                body.echo, body.seed)
                prompt_text = prompt if isinstance(prompt, str) else runtime.detokenize(ids)
                logprobs = (logprobs_payload(done, prompt_text, body.echo, runtime.token_text)
                            if body.logprobs is not None else None)
                choices.append({"index": index, "text": (prompt_text if body.echo else "") + done.text,
                                "finish_reason": done.finish_reason, "logprobs": logprobs})
                prompt_total += len(ids)
                completion_total += len(done.generated.tokens)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": host.model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt_total, "completion_tokens": completion_total,
                          "total_tokens": prompt_total + completion_total}}

    # vLLM's tokenizer endpoints: lm-eval's remote tokenizer uses them, so scoring requests carry the
    # served model's own token ids (a GGUF's llama.cpp vocabulary, not a separately loaded HF tokenizer)
    @app.get("/tokenizer_info")
    def tokenizer_info(request: Request):
        try:
            authorize(request)
        except RequestError as exc:
            return error(exc)
        return host.served.runtime.tokenizer_info()  # tokenizer only: no need to wait for the model lock

    async def tokenizer_call(request: Request, model_cls, answer):
        try:
            authorize(request)
            body = parse(model_cls, await request.body())
        except RequestError as exc:
            return error(exc)
        return answer(host.served.runtime, body)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        def answer(runtime, body: TokenizeRequest) -> dict:
            tokens = runtime.tokenize(body.prompt, add_special=body.add_special_tokens)
            return {"tokens": tokens, "count": len(tokens), "max_model_len": runtime.context_length}

        return await tokenizer_call(request, TokenizeRequest, answer)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await tokenizer_call(request, DetokenizeRequest,
                                    lambda runtime, body: {"prompt": runtime.detokenize(body.tokens)})

    def counted(count_prompt) -> int:
        with host.lock:
            return count_prompt(host.served.runtime)

    def complete(generate) -> tuple[str, int]:
        with host.lock:
            runtime = host.served.runtime
            text = "".join(generate(runtime))
            return text, runtime.count_tokens(text)

    async def respond(body, kind: str, generate, count_prompt, max_tokens: int):
        from starlette.concurrency import run_in_threadpool

        # the model works in worker threads: the event loop keeps serving other clients meanwhile
        prompt_tokens = await run_in_threadpool(counted, count_prompt)
        if prompt_tokens > limits.max_prompt_tokens:
            return error(RequestError(f"prompt is {prompt_tokens} tokens, above this server's limit of "
                                      f"{limits.max_prompt_tokens}"))
        ident = new_id(kind)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_events(ident, kind, generate, prompt_tokens, max_tokens, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, completion_tokens = await run_in_threadpool(complete, generate)
        return completion_response(kind, ident, host.model_id, text, prompt_tokens, completion_tokens, max_tokens)

    def stream_events(ident, kind, generate, prompt_tokens, max_tokens, include_usage) -> Iterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        created = int(time.time())

        def event(choice: dict, usage=None) -> str:
            payload = {"id": ident, "object": chunk_kind, "created": created, "model": host.model_id,
                       "choices": [choice] if choice else []}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        with host.lock:  # held for the whole stream: one generation at a time, the others wait their turn
            runtime = host.served.runtime
            if kind == "chat.completion":
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            text = ""
            for piece in generate(runtime):
                text += piece
                yield event({"index": 0, "delta": {"content": piece}, "finish_reason": None} if kind == "chat.completion"
                            else {"index": 0, "text": piece, "finish_reason": None, "logprobs": None})
            completion_tokens = runtime.count_tokens(text)
        finish = "length" if completion_tokens >= max_tokens else "stop"
        yield event({"index": 0, "delta": {}, "finish_reason": finish} if kind == "chat.completion"
                    else {"index": 0, "text": "", "finish_reason": finish, "logprobs": None})
        if include_usage:
            yield event({}, {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens})
        yield "data: [DONE]\n\n"

    return app

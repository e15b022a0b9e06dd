"""The OpenAI-compatible gateway in front of an engine (`ftq.engines`): GET /v1/models, POST
/v1/chat/completions and /v1/completions (server-sent events when `stream` is true), vLLM's
/tokenizer_info, /tokenize and /detokenize, GET /health, GET /metrics (Prometheus) and the web chat page.

The engine batches concurrent requests; the gateway decides who gets in. `parallel` requests run at once,
up to `max_queued` more wait, and beyond that a request gets 503 with Retry-After. Bodies over the size limit
get 413 before they are parsed. Prompts are rendered and counted by the engine off the event loop, and
checked before a slot is taken. A client that disconnects ends its generation in the engine at once.

Completions with `echo`/`logprobs`, token-id or batched prompts are scored exactly by an in-process runtime
(`ftq.openai.scoring`), loaded on the first such request; they take a slot like any other request."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ftq.engines import EngineError, Settings
from ftq.openai.schema import (ChatRequest, CompletionRequest, DetokenizeRequest, Limits, RequestError,
                               TokenizeRequest, budget, check_prompt, completion_response, error_body, new_id, parse,
                               usage)
from ftq.registry.resolve import Resolved, fetch, lookup, resolve
from ftq.serve import CTX_SIZE, MAX_QUEUED, PARALLEL
from ftq.serve.admission import BodyLimit, Busy, ClosingStream, Gate, until_disconnected
from ftq.serve.metrics import Counted, Metrics

log = logging.getLogger(__name__)


@dataclass
class Served:
    resolved: Resolved
    engine: Any
    format: str
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    _scorer: Any = None
    scorer_lock: threading.Lock = field(default_factory=threading.Lock)
    _tool_template: Any = None

    async def tool_template(self):
        """How this model renders tools (ftq.serve.tool_calls), probed from its chat template on first use."""
        from ftq.serve.tool_calls import ToolTemplate

        if self._tool_template is None:
            self._tool_template = ToolTemplate.probe(await self.engine.tokenizer_info())
        return self._tool_template

    def scorer(self, n_ctx: int):
        """The in-process runtime for exact logprobs, loaded on first use (a second copy of the weights).
        The caller holds `scorer_lock`: one scoring request at a time."""
        from ftq.runtimes import open_model

        if self._scorer is None:
            self._scorer = open_model(self.resolved.path, n_ctx=n_ctx)
        return self._scorer

    def close(self) -> None:
        self.engine.close()
        if self._scorer is not None:
            self._scorer.close()


class ModelHost:
    """The served model, swapped in place when `--watch` sees the alias move."""

    def __init__(self, reference: str, params: dict | None = None, threads: int | None = None, n_ctx: int = CTX_SIZE,
                 parallel: int = PARALLEL):
        self.reference = reference
        self.params = params
        self.threads = threads
        self.n_ctx = n_ctx
        self.parallel = parallel
        self.served = self._load(resolve(reference, params))

    def _load(self, resolved: Resolved) -> Served:
        from ftq.engines import open_engine
        from ftq.runtimes import artifact_format

        log.info("loading %s (%s)", resolved.path, resolved.reference)
        return Served(resolved, open_engine(resolved.path, self.threads, self.n_ctx, self.parallel),
                      artifact_format(resolved.path))

    def reload_if_moved(self) -> bool:
        if self.served.resolved.version is None:  # a local path: nothing to follow
            return False
        found = lookup(self.reference, self.params)  # one registry call; download and verify only on a move
        if found.version == self.served.resolved.version:
            return False
        new = self._load(fetch(found, self.params))
        old, self.served = self.served, new
        log.info("now serving %s version %s", new.resolved.name, new.resolved.version)
        deadline = time.time() + 3600
        while old.inflight and time.time() < deadline:  # requests already running finish on the old engine
            time.sleep(0.5)
        old.close()
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

    def close(self) -> None:
        self.served.close()


def create_app(host: ModelHost, api_key: str | None = None, limits: Limits | None = None,
               max_queued: int = MAX_QUEUED) -> FastAPI:
    limits = limits or Limits()
    gate = Gate(host.parallel, max_queued)
    metrics = Metrics(gate)
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await host.served.engine.warm_up()
        yield
        host.close()  # before uvicorn re-raises SIGTERM/SIGINT: the engine process stops with the gateway

    app = FastAPI(title="ftq serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    expected = f"Bearer {api_key}".encode() if api_key else None

    def keyed(request: Request) -> bool:
        return expected is None or hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    def authorize(request: Request) -> None:
        if not keyed(request):
            raise RequestError("missing or wrong API key (Authorization: Bearer ...)", 401, "authentication_error")

    def error(exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Busy) else None
        return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)

    app.add_middleware(Counted, metrics=metrics)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, exc: RequestError):
        return error(exc)

    @app.exception_handler(EngineError)
    async def engine_error(_request: Request, exc: EngineError):
        log.error("engine: %s", exc)
        return JSONResponse({"error": {"message": str(exc), "type": "server_error", "code": 500}}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page():
        from ftq.serve.page import PAGE

        name = host.model_id
        return (PAGE.replace("__MODEL__", html.escape(name)).replace("__NEEDS_KEY__", "true" if api_key else "false")
                .replace("__MAX_TOKENS__", str(min(512, limits.max_tokens))))

    @app.get("/health")
    def health(request: Request):
        served = host.served
        resolved = served.resolved
        alive = served.engine.alive()
        answer = {"status": "ok" if alive else "engine stopped", "model": resolved.name, "version": resolved.version,
                  "alias": resolved.alias, "sha256": resolved.sha256, "format": served.format,
                  "engine": served.engine.kind, "parallel": gate.slots, "active": gate.active, "queued": gate.queued,
                  "max_queued": gate.max_queued, "loaded_at": served.loaded_at}
        if keyed(request):  # where the files are is for the key holder only
            answer.update(reference=resolved.reference, path=str(resolved.path))
        return JSONResponse(answer, status_code=200 if alive else 503)

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": host.model_id, "object": "model",
                                            "created": int(host.served.loaded_at), "owned_by": "ftq"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse(ChatRequest, await request.body())
        max_tokens = budget(limits, body.max_completion_tokens or body.max_tokens)
        settings = settings_of(body, max_tokens)
        served = host.served
        messages = body.conversation()
        shown_tools = body.tool_list()
        opening = None  # None: plain chat; else the answer is parsed for calls (opening: a forced call's start)
        if shown_tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            template = await served.tool_template()
            text, forced = template.prompt(messages, shown_tools, body.forced_function() if shown_tools else None)
            opening = forced if shown_tools else None
        else:
            text = await served.engine.chat_prompt(messages)
        prompt = await served.engine.tokenize(text, False)
        check_prompt(limits, len(prompt), max_tokens, served.engine.context_length)
        return await generation(request, body, "chat.completion", served, prompt, settings, opening)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = parse(CompletionRequest, await request.body())
        max_tokens = budget(limits, body.max_tokens)
        settings = settings_of(body, max_tokens)
        served = host.served
        if body.needs_scoring():
            if body.stream:
                raise RequestError("stream: not supported with echo, logprobs or token-id/batched prompts")
            return await scored(request, body, served, max_tokens)
        prompt = await served.engine.tokenize(body.prompt, True)
        check_prompt(limits, len(prompt), max_tokens, served.engine.context_length)
        return await generation(request, body, "text_completion", served, prompt, settings)

    def settings_of(body, max_tokens: int) -> Settings:
        return Settings(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        stop=tuple(body.stop_list()), seed=body.seed, ignore_eos=body.ignore_eos)

    async def scored(request: Request, body: CompletionRequest, served: Served, max_tokens: int):
        from ftq.openai.scoring import check_prompts, prompt_ids, scored_completions

        def work() -> dict:
            with served.scorer_lock:
                runtime = served.scorer(served.engine.context_length)
                batch = prompt_ids(runtime, body)
                check_prompts(batch, limits, max_tokens, runtime.context_length)
                return scored_completions(runtime, body, batch, max_tokens, host.model_id)

        ticket = gate.admit()
        async with ticket:
            return await run_in_threadpool(work)

    async def generation(request: Request, body, kind: str, served: Served, prompt: list[int], settings: Settings,
                         opening: str | None = None):
        ticket = gate.admit()
        metrics.prompt_tokens.inc(len(prompt))
        ident = new_id(kind)
        if body.stream:
            events = stream_events(ticket, ident, kind, served, prompt, settings, body.include_usage(), opening)
            return ClosingStream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        work = asyncio.ensure_future(whole(ticket, served, prompt, settings))
        left = asyncio.ensure_future(until_disconnected(request.receive))
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: stop generating for it
            work.cancel()
            metrics.disconnects.inc()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)
        left.cancel()
        text, tokens, finish = work.result()
        response = completion_response(kind, ident, host.model_id, text, len(prompt), tokens, settings.max_tokens, finish)
        if opening is not None:
            from ftq.serve.tool_calls import message

            answer, called = message(opening + text)
            response["choices"][0].update(message=answer, finish_reason=called or response["choices"][0]["finish_reason"])
        return response

    async def pieces(ticket, served: Served, prompt: list[int], settings: Settings, route: str):
        """The engine's pieces for one request, holding a slot; records latency and tokens."""
        async with ticket:
            served.inflight += 1
            start, first, tokens = time.perf_counter(), None, 0
            generated = served.engine.generate(prompt, settings)
            try:
                async for piece in generated:
                    if first is None:
                        first = time.perf_counter()
                        metrics.first_token.observe(first - start)
                    metrics.generation_tokens.inc(piece.tokens - tokens)
                    tokens = piece.tokens
                    yield piece
                metrics.latency.labels(route).observe(time.perf_counter() - start)
            finally:
                await generated.aclose()  # a disconnect or error: the engine cancels the sequence now
                served.inflight -= 1

    async def whole(ticket, served: Served, prompt: list[int], settings: Settings) -> tuple[str, int, str]:
        text, tokens, finish = [], 0, "stop"
        async for piece in pieces(ticket, served, prompt, settings, "whole"):
            text.append(piece.text)
            tokens, finish = piece.tokens, piece.finish or finish
        return "".join(text), tokens, finish

    async def stream_events(ticket, ident: str, kind: str, served: Served, prompt: list[int], settings: Settings,
                            include_usage: bool, opening: str | None = None):
        chat = kind == "chat.completion"
        created = int(time.time())

        def event(choice: dict | None, extra: dict | None = None) -> str:
            payload = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": created, "model": host.model_id, "choices": [choice] if choice else []}
            return b"data: " + orjson.dumps({**payload, **(extra or {})}) + b"\n\n"

        def choice(text: str, finish: str | None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        tokens, finish = 0, "stop"
        generated = pieces(ticket, served, prompt, settings, "stream")
        if opening is not None:
            from ftq.serve.tool_calls import StreamHold

            hold = StreamHold(opening)
        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for piece in generated:
                tokens, finish = piece.tokens, piece.finish or finish
                text = hold.feed(piece.text) if opening is not None else piece.text
                if text:
                    yield event(choice(text, None))
            if opening is not None:
                rest, calls = hold.finish()
                if rest:
                    yield event(choice(rest, None))
                if calls:
                    finish = "tool_calls"
                    yield event({"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                        {"index": i, **call} for i, call in enumerate(calls)]}})
            yield event(choice("", finish))
            if include_usage:
                yield event(None, {"usage": usage(len(prompt), tokens)})
        except asyncio.CancelledError:
            metrics.disconnects.inc()
            raise
        except Exception as exc:  # the engine failed mid-stream: the status line is sent, so say it in the stream
            log.exception("stream %s failed", ident)
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error', 'code': 500}})}\n\n"
        finally:
            ticket.drop()  # still queued when the client left: give the place back
            await generated.aclose()
        yield "data: [DONE]\n\n"

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        authorize(request)
        return await host.served.engine.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        authorize(request)
        body = parse(TokenizeRequest, await request.body())
        engine = host.served.engine
        tokens = await engine.tokenize(body.prompt, body.add_special_tokens)
        check_prompt(limits, len(tokens), 0, engine.context_length)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        authorize(request)
        body = parse(DetokenizeRequest, await request.body())
        if len(body.tokens) > limits.max_batch_tokens:
            raise RequestError(f"tokens: {len(body.tokens)} tokens, above this server's limit of "
                               f"{limits.max_batch_tokens}")
        return {"prompt": await host.served.engine.detokenize(body.tokens)}

    return app

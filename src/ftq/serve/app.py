"""The OpenAI-compatible gateway in front of an engine (`ftq.engines`): GET /v1/models, POST
/v1/chat/completions and /v1/completions (server-sent events when `stream` is true), vLLM's
/tokenizer_info, /tokenize and /detokenize, GET /health, GET /metrics (Prometheus) and the web chat page.

The engine batches concurrent requests; the gateway decides who gets in. `parallel` requests run at once,
up to `max_queued` more wait, and beyond that a request gets 503 with Retry-After. Bodies over the size limit
get 413 before they are parsed. Prompts are rendered and counted by the engine off the event loop, and
checked before a slot is taken; a tool request's prompt is rendered in a worker thread
(`ftq.serve.tool_calls`). A client that disconnects ends its generation in the engine at once.

Before any route: the Host, Origin and Content-Type checks of `ftq.serve.guard`. `--watch` swaps models
with one in memory at a time (`ftq.serve.swap`): requests during the swap get 503 with Retry-After.

Completions with `echo`/`logprobs`, token-id or batched prompts are scored exactly by an in-process runtime
(`ftq.openai.scoring`), loaded on the first such request; they take a slot like any other request."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ftq.engines import EngineError, Sampling
from ftq.openai.schema import (ChatRequest, CompletionRequest, DetokenizeRequest, Limits, RequestError,
                               TokenizeRequest, budget, check_prompt, completion_response, error_body, new_id, parse,
                               usage)
from ftq.registry.resolve import Resolved, fetch, lookup, resolve
from ftq.serve import CTX_SIZE, MAX_QUEUED, PARALLEL
from ftq.serve.admission import BodyLimit, ClosingStream, Gate, until_disconnected
from ftq.serve.guard import KeyCheck, Policy, add_openapi, protect
from ftq.serve.metrics import Counted, Metrics
from ftq.serve.swap import Holding, Occupancy, Swapping, hold
from ftq.serve.tool_calls import Calling

log = logging.getLogger(__name__)
DRAIN_SECONDS = 600  # how long a swap waits for requests on the old model before stopping it anyway


@dataclass
class Served:
    resolved: Resolved
    engine: Any
    format: str
    loaded_at: float = field(default_factory=time.time)
    inflight: int = 0
    _logprob_runtime: Any = None
    logprob_lock: threading.Lock = field(default_factory=threading.Lock)
    _tool_template: Any = None

    async def tool_template(self):
        """How this model renders tools (ftq.serve.tool_calls), probed from its chat template on first use."""
        from ftq.serve.tool_calls import ToolTemplate

        if self._tool_template is None:
            self._tool_template = await ToolTemplate.probe_off_loop(await self.engine.tokenizer_info())
        return self._tool_template

    def logprob_runtime(self, n_ctx: int):
        """The in-process runtime for exact logprobs, loaded on first use (a second copy of the weights,
        kept in RAM: on a GPU the engine already holds them in VRAM, and a GGUF over half the card would
        not fit twice). The caller holds `logprob_lock`: one such request at a time."""
        from ftq.runtimes import open_model

        if self._logprob_runtime is None:
            self._logprob_runtime = open_model(self.resolved.path, n_ctx=n_ctx, gpu=False)
        return self._logprob_runtime

    def close(self) -> None:
        self.engine.close()
        if self._logprob_runtime is not None:
            self._logprob_runtime.close()


class ModelHost:
    """The served model, swapped in place when `--watch` sees the alias move."""

    def __init__(self, reference: str, params: dict | None = None, threads: int | None = None, n_ctx: int = CTX_SIZE,
                 parallel: int = PARALLEL):
        self.reference = reference
        self.params = params
        self.threads = threads
        self.n_ctx = n_ctx
        self.parallel = parallel
        self.occupancy = Occupancy()
        self.load_seconds = 1.0
        self.served: Served | None = self._load(resolve(reference, params))

    def _load(self, resolved: Resolved) -> Served:
        from ftq.engines import open_engine
        from ftq.runtimes import artifact_format

        log.info("loading %s (%s)", resolved.path, resolved.reference)
        started = time.monotonic()
        served = Served(resolved, open_engine(resolved.path, self.threads, self.n_ctx, self.parallel),
                        artifact_format(resolved.path))
        self.load_seconds = time.monotonic() - started  # what a client waits during the next swap
        return served

    def current(self) -> Served:
        """The served model, or 503 with Retry-After while it is being swapped."""
        served = self.served
        if served is None or self.occupancy.swapping:
            raise Swapping(max(1, round(self.load_seconds)))
        return served

    def acquire(self, request: Request) -> Served:
        """The served model, held by this request until its response is complete (a swap waits for it)."""
        if not self.occupancy.enter():
            raise Swapping(max(1, round(self.load_seconds)))
        hold(request.scope, self.occupancy.leave)
        return self.current()

    def reload_if_moved(self) -> bool:
        resolved = self.current().resolved
        if resolved.version is None:  # a local path: nothing to follow
            return False
        found = lookup(self.reference, self.params)  # one registry call; download and verify only on a move
        if found.version == resolved.version:
            return False
        self.swap(fetch(found, self.params))  # downloaded and verified while the old version still serves
        return True

    def swap(self, resolved: Resolved) -> None:
        """One model in memory: the old engine stops before the new one starts; requests meanwhile get 503.
        If the new one fails to start, the old version is started again."""
        if not self.occupancy.drain(DRAIN_SECONDS):
            log.warning("swap: requests still running on the old model after %d s are cut off", DRAIN_SECONDS)
        old, self.served = self.served, None
        try:
            old.close()
            try:
                self.served = self._load(resolved)
            except Exception:
                log.exception("swap: %s did not start; serving %s again", resolved.reference, old.resolved.reference)
                self.served = self._load(old.resolved)
                raise
            log.info("now serving %s version %s", resolved.name, resolved.version)
        finally:
            self.occupancy.reopen()

    def watch(self, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            try:
                self.reload_if_moved()
            except Exception as exc:  # keep serving the current model if the registry is unreachable
                log.warning("watch: %s", exc)

    def close(self) -> None:
        if self.served is not None:
            self.served.close()


async def chat_prompt(served: Served, body: ChatRequest) -> tuple[str, Calling | None]:
    """The prompt text, and how the answer is read back for tool calls (None: plain chat)."""
    messages = body.conversation()
    shown_tools = body.tool_list()
    if not shown_tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return await served.engine.chat_prompt(messages), None
    template = await served.tool_template()
    text, opening = await template.render(messages, shown_tools, body.forced_function() if shown_tools else None)
    return text, Calling.of(opening, shown_tools) if shown_tools else None


def create_app(host: ModelHost, api_key: str | None = None, limits: Limits | None = None,
               max_queued: int = MAX_QUEUED, policy: Policy | None = None) -> FastAPI:
    limits = limits or Limits()
    gate = Gate(host.parallel, max_queued)
    metrics = Metrics(gate)
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await host.current().engine.warm_up()
        yield
        host.close()  # before uvicorn re-raises SIGTERM/SIGINT: the engine process stops with the gateway

    app = FastAPI(title="ftq serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(Holding)
    protect(app, policy or Policy.for_bind("127.0.0.1"))
    app.add_middleware(Counted, metrics=metrics)
    key = KeyCheck(api_key)
    keyed, authorize = key.keyed, key.authorize
    add_openapi(app, key)

    def error(exc: RequestError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)  # a full queue (Busy) or a swap
        return JSONResponse(error_body(exc), status_code=exc.status,
                            headers={"Retry-After": str(retry_after)} if retry_after else None)

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

        name = host.current().resolved.name
        return (PAGE.replace("__MODEL__", html.escape(name)).replace("__NEEDS_KEY__", "true" if api_key else "false")
                .replace("__MAX_TOKENS__", str(min(512, limits.max_tokens))))

    @app.get("/health")
    def health(request: Request):
        try:
            served = host.current()
        except Swapping as exc:
            return JSONResponse({"status": "swapping", "retry_after": exc.retry_after}, status_code=503,
                                headers={"Retry-After": str(exc.retry_after)})
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
        served = host.current()
        return {"object": "list", "data": [{"id": served.resolved.name, "object": "model",
                                            "created": int(served.loaded_at), "owned_by": "ftq"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = parse(ChatRequest, await request.body())
        max_tokens = budget(limits, body.max_completion_tokens or body.max_tokens)
        sampling = sampling_of(body, max_tokens)
        served = host.acquire(request)
        text, calling = await chat_prompt(served, body)
        prompt = await served.engine.tokenize(text, False)
        check_prompt(limits, len(prompt), max_tokens, served.engine.context_length)
        return await generation(request, body, "chat.completion", served, prompt, sampling, calling)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = parse(CompletionRequest, await request.body())
        max_tokens = budget(limits, body.max_tokens)
        sampling = sampling_of(body, max_tokens)
        served = host.acquire(request)
        if body.needs_scoring():
            if body.stream:
                raise RequestError("stream: not supported with echo, logprobs or token-id/batched prompts")
            return await scored(request, body, served, max_tokens)
        prompt = await served.engine.tokenize(body.prompt, True)
        check_prompt(limits, len(prompt), max_tokens, served.engine.context_length)
        return await generation(request, body, "text_completion", served, prompt, sampling)

    def sampling_of(body, max_tokens: int) -> Sampling:
        return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        stop=tuple(body.stop_list()), seed=body.seed, ignore_eos=body.ignore_eos)

    async def scored(request: Request, body: CompletionRequest, served: Served, max_tokens: int):
        from ftq.openai.scoring import check_prompts, prompt_ids, scored_completions

        def work() -> dict:
            with served.logprob_lock:
                runtime = served.logprob_runtime(served.engine.context_length)
                batch = prompt_ids(runtime, body)
                check_prompts(batch, limits, max_tokens, runtime.context_length)
                return scored_completions(runtime, body, batch, max_tokens, served.resolved.name)

        ticket = gate.admit()
        async with ticket:
            return await run_in_threadpool(work)

    async def generation(request: Request, body, kind: str, served: Served, prompt: list[int], sampling: Sampling,
                         calling: Calling | None = None):
        ticket = gate.admit()
        metrics.prompt_tokens.inc(len(prompt))
        ident = new_id(kind)
        if body.stream:
            events = stream_events(ticket, ident, kind, served, prompt, sampling, body.include_usage(), calling)
            return ClosingStream(events, ticket, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        work = asyncio.ensure_future(whole(ticket, served, prompt, sampling))
        left = asyncio.ensure_future(until_disconnected(request.receive))
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: stop generating for it
            work.cancel()
            metrics.disconnects.inc()
            await asyncio.gather(work, return_exceptions=True)
            ticket.drop()  # cancelled before it started: it never entered the queue's `async with`
            return Response(status_code=499)
        left.cancel()
        text, tokens, finish = work.result()
        response = completion_response(kind, ident, served.resolved.name, text, len(prompt), tokens,
                                       sampling.max_tokens, finish)
        if calling is not None:
            answer, called = calling.message(text)
            response["choices"][0].update(message=answer, finish_reason=called or response["choices"][0]["finish_reason"])
        return response

    async def pieces(ticket, served: Served, prompt: list[int], sampling: Sampling, route: str):
        """The engine's pieces for one request, holding a slot; records latency and tokens."""
        async with ticket:
            served.inflight += 1
            start, first, tokens = time.perf_counter(), None, 0
            generated = served.engine.generate(prompt, sampling)
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

    async def whole(ticket, served: Served, prompt: list[int], sampling: Sampling) -> tuple[str, int, str]:
        text, tokens, finish = [], 0, "stop"
        async for piece in pieces(ticket, served, prompt, sampling, "whole"):
            text.append(piece.text)
            tokens, finish = piece.tokens, piece.finish or finish
        return "".join(text), tokens, finish

    async def stream_events(ticket, ident: str, kind: str, served: Served, prompt: list[int], sampling: Sampling,
                            include_usage: bool, calling: Calling | None = None):
        chat = kind == "chat.completion"
        created = int(time.time())

        def event(choice: dict | None, extra: dict | None = None) -> str:
            payload = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": created, "model": served.resolved.name, "choices": [choice] if choice else []}
            return b"data: " + orjson.dumps({**payload, **(extra or {})}) + b"\n\n"

        def choice(text: str, finish: str | None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        tokens, finish = 0, "stop"
        generated = pieces(ticket, served, prompt, sampling, "stream")
        held = calling.hold() if calling is not None else None
        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            async for piece in generated:
                tokens, finish = piece.tokens, piece.finish or finish
                text = held.feed(piece.text) if held is not None else piece.text
                if text:
                    yield event(choice(text, None))
            if held is not None:
                rest, calls = held.finish()
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
            yield b"data: " + orjson.dumps({"error": stream_error(exc)}) + b"\n\n"
        finally:
            ticket.drop()  # still queued when the client left: give the place back
            await generated.aclose()
        yield "data: [DONE]\n\n"

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        authorize(request)
        return await host.acquire(request).engine.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        authorize(request)
        body = parse(TokenizeRequest, await request.body())
        engine = host.acquire(request).engine
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
        return {"prompt": await host.acquire(request).engine.detokenize(body.tokens)}

    return app


def stream_error(exc: Exception) -> dict:
    """What a stream says when it fails after its status line: an engine's error (its messages name no
    socket or key), or nothing of an unexpected exception, whose text may hold anything (it is logged)."""
    message = str(exc) if isinstance(exc, EngineError) else "internal error (see the server's log)"
    return {"message": message, "type": "server_error", "code": 500}

"""The OpenAI-compatible gateway in front of an engine (`ftq.engines`): GET /v1/models, POST
/v1/chat/completions and /v1/completions (server-sent events when `stream` is true), vLLM's
/tokenizer_info, /tokenize and /detokenize, GET /health, GET /metrics (Prometheus) and the web chat page.

The engine batches concurrent requests; the gateway decides who gets in. `parallel` requests run at once,
up to `max_queued` more wait, and beyond that a request gets 503 with Retry-After. Bodies over the size limit
get 413 before they are parsed. Prompts are rendered and counted by the engine off the event loop, and
checked before a slot is taken; a tool request's prompt is rendered in a worker thread
(`ftq.serve.tool_calls`). A client that disconnects ends its generation in the engine at once.

Before any route: the Host, Origin and Content-Type checks of `ftq.serve.guard`. `--watch` swaps models
with one in memory at a time (`ftq.serve.host`): requests during the swap get 503 with Retry-After.

Completions with `echo`/`logprobs`, token-id or batched prompts are scored exactly by an in-process runtime
(`ftq.openai.scoring`), loaded on the first such request; they take a slot like any other request.

`Gateway` holds what the request paths share (the served model, the limits, the admission gate, the key,
the metrics) and has one method per route; `create_app` only wires them into a FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ftq.engines import EngineError, Sampling
from ftq.openai.schema import (ChatRequest, Chunks, CompletionRequest, DetokenizeRequest, GenerationRequest, Limits,
                               RequestError, TokenizeRequest, budget, check_prompt, completion_response, error_body,
                               new_id, parse)
from ftq.serve import MAX_QUEUED
from ftq.serve.admission import BodyLimit, ClosingStream, Gate, Ticket, until_disconnected
from ftq.serve.guard import KeyCheck, Policy, add_openapi, protect
from ftq.serve.host import ModelHost, Served
from ftq.serve.metrics import Counted, Metrics
from ftq.serve.swap import Holding, Swapping
from ftq.serve.tool_calls import Calling

log = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"  # the last event of a stream, after an engine error too


@dataclass
class Job:
    """One generation let in at the gate: its place (waiting, then holding a slot), the model it holds,
    its prompt's token ids and how it samples."""

    ticket: Ticket
    served: Served
    prompt: list[int]
    sampling: Sampling


def sampling_of(body: GenerationRequest, max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                    stop=tuple(body.stop_list()), seed=body.seed, ignore_eos=body.ignore_eos)


async def chat_prompt(served: Served, body: ChatRequest) -> tuple[str, Calling | None]:
    """The prompt text, and how the answer is read back for tool calls (None: plain chat)."""
    messages = body.conversation()
    shown_tools = body.tool_list()
    if not shown_tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        return await served.engine.chat_prompt(messages), None
    template = await served.tool_template()
    text, opening = await template.render(messages, shown_tools, body.forced_function() if shown_tools else None)
    return text, Calling.of(opening, shown_tools) if shown_tools else None


def stream_error(exc: Exception) -> dict:
    """What a stream says when it fails after its status line: an engine's error (its messages name no
    socket or key), or nothing of an unexpected exception, whose text may hold anything (it is logged)."""
    message = str(exc) if isinstance(exc, EngineError) else "internal error (see the server's log)"
    return {"message": message, "type": "server_error", "code": 500}


class Gateway:
    """The request paths of `ftq serve`, one method each."""

    def __init__(self, host: ModelHost, api_key: str | None, limits: Limits, max_queued: int):
        self.host = host
        self.limits = limits
        self.needs_key = bool(api_key)  # the chat page asks for one
        self.key = KeyCheck(api_key)
        self.gate = Gate(host.parallel, max_queued)
        self.metrics = Metrics(self.gate)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        await self.host.current().engine.warm_up()
        yield
        self.host.close()  # before uvicorn re-raises SIGTERM/SIGINT: the engine process stops with the gateway

    # -- errors

    async def request_error(self, _request: Request, exc: RequestError):
        retry_after = getattr(exc, "retry_after", None)  # a full queue (Busy) or a swap
        return JSONResponse(error_body(exc), status_code=exc.status,
                            headers={"Retry-After": str(retry_after)} if retry_after else None)

    async def engine_error(self, _request: Request, exc: EngineError):
        log.error("engine: %s", exc)
        return JSONResponse({"error": {"message": str(exc), "type": "server_error", "code": 500}}, status_code=500)

    # -- the page, health and metrics

    def page(self):
        from ftq.serve.page import PAGE

        name = self.host.current().resolved.name
        return (PAGE.replace("__MODEL__", html.escape(name))
                .replace("__NEEDS_KEY__", "true" if self.needs_key else "false")
                .replace("__MAX_TOKENS__", str(min(512, self.limits.max_tokens))))

    def health(self, request: Request):
        try:
            served = self.host.current()
        except Swapping as exc:
            return JSONResponse({"status": "swapping", "retry_after": exc.retry_after}, status_code=503,
                                headers={"Retry-After": str(exc.retry_after)})
        resolved, gate = served.resolved, self.gate
        alive = served.engine.alive()
        answer = {"status": "ok" if alive else "engine stopped", "model": resolved.name, "version": resolved.version,
                  "alias": resolved.alias, "sha256": resolved.sha256, "format": served.format,
                  "engine": served.engine.kind, "parallel": gate.slots, "active": gate.active, "queued": gate.queued,
                  "max_queued": gate.max_queued, "loaded_at": served.loaded_at}
        if self.key.keyed(request):  # where the files are is for the key holder only
            answer.update(model_uri=resolved.model_uri, path=str(resolved.path))
        return JSONResponse(answer, status_code=200 if alive else 503)

    def prometheus(self):
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- the OpenAI API

    def models(self, request: Request):
        self.key.authorize(request)
        served = self.host.current()
        return {"object": "list", "data": [{"id": served.resolved.name, "object": "model",
                                            "created": int(served.loaded_at), "owned_by": "ftq"}]}

    async def chat_completions(self, request: Request):
        self.key.authorize(request)
        body = parse(ChatRequest, await request.body())
        max_tokens = budget(self.limits, body.max_completion_tokens or body.max_tokens)
        sampling = sampling_of(body, max_tokens)
        served = self.host.acquire(request)
        text, calling = await chat_prompt(served, body)
        prompt = await served.engine.tokenize(text, False)
        check_prompt(self.limits, len(prompt), max_tokens, served.engine.context_length)
        return await self.respond(request, body, "chat.completion", served, prompt, sampling, calling)

    async def completions(self, request: Request):
        self.key.authorize(request)
        body = parse(CompletionRequest, await request.body())
        max_tokens = budget(self.limits, body.max_tokens)
        sampling = sampling_of(body, max_tokens)
        served = self.host.acquire(request)
        if body.needs_scoring():
            if body.stream:
                raise RequestError("stream: not supported with echo, logprobs or token-id/batched prompts")
            return await self.scored(body, served, max_tokens)
        prompt = await served.engine.tokenize(body.prompt, True)
        check_prompt(self.limits, len(prompt), max_tokens, served.engine.context_length)
        return await self.respond(request, body, "text_completion", served, prompt, sampling)

    # -- vLLM's tokenizer endpoints

    async def tokenizer_info(self, request: Request):
        self.key.authorize(request)
        return await self.host.acquire(request).engine.tokenizer_info()

    async def tokenize(self, request: Request):
        self.key.authorize(request)
        body = parse(TokenizeRequest, await request.body())
        engine = self.host.acquire(request).engine
        tokens = await engine.tokenize(body.prompt, body.add_special_tokens)
        check_prompt(self.limits, len(tokens), 0, engine.context_length)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length}

    async def detokenize(self, request: Request):
        self.key.authorize(request)
        body = parse(DetokenizeRequest, await request.body())
        if len(body.tokens) > self.limits.max_batch_tokens:
            raise RequestError(f"tokens: {len(body.tokens)} tokens, above this server's limit of "
                               f"{self.limits.max_batch_tokens}")
        return {"prompt": await self.host.acquire(request).engine.detokenize(body.tokens)}

    # -- exact logprobs: the in-process runtime, one request at a time

    async def scored(self, body: CompletionRequest, served: Served, max_tokens: int) -> dict:
        async with self.gate.admit():  # a slot like any other request: the gate's limits count scoring too
            return await run_in_threadpool(self.score, body, served, max_tokens)

    def score(self, body: CompletionRequest, served: Served, max_tokens: int) -> dict:
        from ftq.openai.scoring import check_prompts, prompt_ids, scored_completions

        with served.logprob_lock:
            runtime = served.logprob_runtime(served.engine.context_length)
            batch = prompt_ids(runtime, body)
            check_prompts(batch, self.limits, max_tokens, runtime.context_length)
            return scored_completions(runtime, body, batch, max_tokens, served.resolved.name)

    # -- generation by the engine

    async def respond(self, request: Request, body: GenerationRequest, kind: str, served: Served, prompt: list[int],
                      sampling: Sampling, calling: Calling | None = None):
        """Lets the request in at the gate (or 503 now) and answers it, streamed or whole."""
        job = Job(self.gate.admit(), served, prompt, sampling)
        self.metrics.prompt_tokens.inc(len(prompt))
        ident = new_id(kind)
        if body.stream:
            events = self.stream_events(job, ident, kind, body.include_usage(), calling)
            return ClosingStream(events, job.ticket, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
        return await self.answer(request, job, ident, kind, calling)

    async def answer(self, request: Request, job: Job, ident: str, kind: str, calling: Calling | None):
        """The whole answer in one response; a client that leaves first stops its generation (499)."""
        work = asyncio.ensure_future(self.whole(job))
        left = asyncio.ensure_future(until_disconnected(request.receive))
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # the client went away: stop generating for it
            work.cancel()
            self.metrics.disconnects.inc()
            await asyncio.gather(work, return_exceptions=True)
            job.ticket.drop()  # cancelled before it started: it never entered the queue's `async with`
            return Response(status_code=499)
        left.cancel()
        text, tokens, finish = work.result()
        response = completion_response(kind, ident, job.served.resolved.name, text, len(job.prompt), tokens,
                                       job.sampling.max_tokens, finish)
        if calling is not None:
            answer, called = calling.message(text)
            response["choices"][0].update(message=answer, finish_reason=called or response["choices"][0]["finish_reason"])
        return response

    async def pieces(self, job: Job, route: str):
        """The engine's pieces for one request, holding a slot; records latency and tokens."""
        async with job.ticket:
            served, metrics = job.served, self.metrics
            served.inflight += 1
            start, first, tokens = time.perf_counter(), None, 0
            generated = served.engine.generate(job.prompt, job.sampling)
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

    async def whole(self, job: Job) -> tuple[str, int, str]:
        text, tokens, finish = [], 0, "stop"
        async for piece in self.pieces(job, "whole"):
            text.append(piece.text)
            tokens, finish = piece.tokens, piece.finish or finish
        return "".join(text), tokens, finish

    async def stream_events(self, job: Job, ident: str, kind: str, include_usage: bool, calling: Calling | None):
        # one generator from the first event to [DONE], so that a disconnect (CancelledError) and the
        # cleanup in `finally` reach the engine's request without a second generator in between
        chunks = Chunks(ident, kind, job.served.resolved.name)
        tokens, finish = 0, "stop"
        generated = self.pieces(job, "stream")
        held = calling.hold() if calling is not None else None
        try:
            if chunks.chat:
                yield chunks.role()
            async for piece in generated:
                tokens, finish = piece.tokens, piece.finish or finish
                text = held.feed(piece.text) if held is not None else piece.text
                if text:
                    yield chunks.text(text)
            if held is not None:
                rest, calls = held.finish()
                if rest:
                    yield chunks.text(rest)
                if calls:
                    finish = "tool_calls"
                    yield chunks.tool_calls(calls)
            yield chunks.text("", finish)
            if include_usage:
                yield chunks.usage(len(job.prompt), tokens)
        except asyncio.CancelledError:
            self.metrics.disconnects.inc()
            raise
        except Exception as exc:  # the engine failed mid-stream: the status line is sent, so say it in the stream
            log.exception("stream %s failed", ident)
            yield chunks.error(stream_error(exc))
        finally:
            job.ticket.drop()  # still queued when the client left: give the place back
            await generated.aclose()
        yield DONE


def create_app(host: ModelHost, api_key: str | None = None, limits: Limits | None = None,
               max_queued: int = MAX_QUEUED, policy: Policy | None = None) -> FastAPI:
    gateway = Gateway(host, api_key, limits or Limits(), max_queued)
    app = FastAPI(title="ftq serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=gateway.lifespan)
    app.add_middleware(BodyLimit, max_bytes=gateway.limits.max_body_bytes)
    app.add_middleware(Holding)
    protect(app, policy or Policy.for_bind("127.0.0.1"))
    app.add_middleware(Counted, metrics=gateway.metrics)
    add_openapi(app, gateway.key)
    app.add_exception_handler(RequestError, gateway.request_error)
    app.add_exception_handler(EngineError, gateway.engine_error)
    app.get("/", response_class=HTMLResponse)(gateway.page)
    app.get("/health")(gateway.health)
    app.get("/metrics")(gateway.prometheus)
    app.get("/v1/models")(gateway.models)
    app.post("/v1/chat/completions")(gateway.chat_completions)
    app.post("/v1/completions")(gateway.completions)
    app.get("/tokenizer_info")(gateway.tokenizer_info)
    app.post("/tokenize")(gateway.tokenize)
    app.post("/detokenize")(gateway.detokenize)
    return app

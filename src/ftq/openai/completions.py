"""The small OpenAI completions app that lm-eval's `local-completions` talks to: /v1/completions (exact
echo logprobs, token-id and batched prompts) and vLLM's /tokenizer_info, /tokenize and /detokenize, over
one runtime the caller has already loaded. Requests take turns on the runtime (lm-eval sends one at a
time); the evaluate stage starts it on a loopback port for the length of a run."""

from __future__ import annotations

import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ftq.openai.schema import (CompletionRequest, DetokenizeRequest, Limits, RequestError, TokenizeRequest, budget,
                               error_body, parse)
from ftq.openai.scoring import check_prompts, prompt_ids, scored_completions


def completions_app(runtime, model: str, limits: Limits) -> FastAPI:
    app = FastAPI(title="ftq completions", docs_url=None, redoc_url=None)
    lock = threading.Lock()

    def answer(body: CompletionRequest) -> dict:
        max_tokens = budget(limits, body.max_tokens)
        with lock:
            batch = prompt_ids(runtime, body)
            check_prompts(batch, limits, max_tokens, runtime.context_length)
            return scored_completions(runtime, body, batch, max_tokens, model)

    async def call(request: Request, model_cls, work):
        try:
            body = parse(model_cls, await request.body())
            if getattr(body, "stream", False):
                raise RequestError("stream: not supported here")
            return await run_in_threadpool(work, body)
        except RequestError as exc:
            return JSONResponse(error_body(exc), status_code=exc.status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await call(request, CompletionRequest, answer)

    @app.get("/tokenizer_info")
    def tokenizer_info():
        return runtime.tokenizer_info()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        def work(body: TokenizeRequest) -> dict:
            with lock:
                tokens = runtime.tokenize(body.prompt, add_special=body.add_special_tokens)
            return {"tokens": tokens, "count": len(tokens), "max_model_len": runtime.context_length}

        return await call(request, TokenizeRequest, work)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        def work(body: DetokenizeRequest) -> dict:
            with lock:
                return {"prompt": runtime.detokenize(body.tokens)}

        return await call(request, DetokenizeRequest, work)

    return app

"""Engines decode many requests at once for `ftq serve` (continuous batching): a request joins the running
batch between decode steps and leaves when it finishes, with its own `Sampling`
(temperature, top_p, stop strings, seed, token budget).

- GGUF files: llama.cpp's own `llama-server` (built from the sources vendored in the llama-cpp-python
  sdist by `make install`), run as a child process on a private Unix socket with its own random key (`llama_server`).
- HF folders (plain, AWQ, GPTQ): transformers' continuous batching manager, paged KV cache (`transformers_cb`).

One small async interface: `chat_prompt`, `tokenize`, `detokenize`, `generate` (an async iterator of
`Piece`s; closing it cancels the request in the engine at once), `tokenizer_info`, `close`. The runtimes
(`ftq.runtimes`) stay the in-process, one-sequence path for scoring and the pipeline's stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Protocol


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded: OpenAI's sampling fields and its token budget."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


class EngineError(RuntimeError):
    """The engine failed a request (not the client's fault)."""


@dataclass
class Piece:
    text: str
    tokens: int  # completion tokens so far
    finish: str | None = None  # "stop" | "length" on the last piece


class Engine(Protocol):
    kind: str
    path: Path
    parallel: int  # sequences decoded together
    context_length: int  # tokens per sequence (prompt + answer)

    async def warm_up(self) -> None: ...

    def alive(self) -> bool: ...

    async def chat_prompt(self, messages: list[dict]) -> str: ...

    async def tokenize(self, text: str, add_special: bool) -> list[int]: ...

    async def detokenize(self, tokens: list[int]) -> str: ...

    def generate(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[Piece]: ...

    async def tokenizer_info(self) -> dict: ...

    def close(self) -> None: ...


def open_engine(path: str | Path, threads: int | None, n_ctx: int, parallel: int) -> Engine:
    from ftq.runtimes import artifact_format, gguf_file

    path = Path(path)
    if artifact_format(path) == "gguf":
        from ftq.engines.llama_server import LlamaServerEngine

        return LlamaServerEngine(gguf_file(path), threads=threads, n_ctx=n_ctx, parallel=parallel)
    from ftq.engines.transformers_cb import TransformersEngine

    return TransformersEngine(path, threads=threads, n_ctx=n_ctx, parallel=parallel)

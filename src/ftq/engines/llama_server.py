"""llama.cpp's own `llama-server` as the GGUF engine: continuous batching over `parallel` slots, each
request with its own sampling settings and seed, in the C++ engine at full speed. ftq keeps the gateway
(registry, validation, limits, API key, metrics) and talks to it on a private loopback port: chat
templates through its /apply-template, tokens through /tokenize, generation through /completion with
token-id prompts. Closing a stream closes the connection, and llama-server cancels the task at once.

The binary is built by `make install` from the sources vendored in the llama-cpp-python sdist (the
same llama.cpp as the runtime) and installed next to the venv's python; $FTQ_LLAMA_SERVER overrides."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import AsyncIterator

import orjson

from ftq.engines import EngineError, Piece, Settings
from ftq.errors import UsageError
from ftq.processes import free_port, stop_group, wait_http

logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per engine call otherwise
START_TIMEOUT = 600  # seconds: a 70B GGUF takes a while to map


def binary() -> Path:
    found = os.environ.get("FTQ_LLAMA_SERVER") or (Path(sys.prefix) / "bin" / "llama-server")
    if not Path(found).exists():
        found = shutil.which("llama-server")
    if not found:
        raise UsageError("llama-server not found: `make install` builds it from the llama-cpp-python sdist "
                         "(or set $FTQ_LLAMA_SERVER to a llama-server binary)")
    return Path(found)


def die_with_parent() -> None:
    """In the child before exec: the kernel stops the engine if ftq is killed (even with SIGKILL), so an
    engine never outlives its gateway holding the model's memory."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def engine_environment() -> dict:
    """This process's environment, less the PASSIVE OpenMP policy that ftq's in-process runtime sets for
    itself: it cuts llama-server's decode speed ~3x (39 vs 112 tok/s on 2 cores). A policy the user set stays."""
    env = dict(os.environ)
    runtime = sys.modules.get("ftq.runtimes.llamacpp")
    if runtime is not None and runtime.SETS_OMP_POLICY:
        env.pop("OMP_WAIT_POLICY", None)
    return env


class LlamaServerEngine:
    kind = "llama-server"

    def __init__(self, path: Path, threads: int | None, n_ctx: int, parallel: int):
        from ftq.runtimes import default_threads

        self.path = Path(path)
        self.parallel = parallel
        self.context_length = n_ctx
        self.threads = threads or default_threads()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="ftq-llama-server-", suffix=".log", delete=False)
        command = [str(binary()), "--model", str(self.path), "--host", "127.0.0.1", "--port", str(self.port),
                   "--threads", str(self.threads), "--threads-batch", str(self.threads),
                   "--parallel", str(parallel), "--ctx-size", str(n_ctx * parallel), "--cont-batching",
                   "--threads-http", str(parallel + 4), "--no-webui", "--jinja", "--alias", self.path.stem]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=engine_environment(), start_new_session=True,
                                        preexec_fn=die_with_parent)
        try:
            wait_http(f"{self.base}/health", self.process, START_TIMEOUT, self.log.name)
        except RuntimeError as exc:
            self.close()
            raise UsageError(f"{self.path}: llama-server did not start: {exc}") from exc
        self._client = None
        self._info = None

    async def warm_up(self) -> None:
        """One tiny request through every engine call, so the first client doesn't pay for imports and connections."""
        prompt = await self.tokenize(await self.chat_prompt([{"role": "user", "content": "Hi"}]), False)
        async for _ in self.generate(prompt, Settings(max_tokens=1, temperature=0.0)):
            pass

    @property
    def client(self):
        import httpx

        if self._client is None:  # made in the serving event loop, on first use
            self._client = httpx.AsyncClient(base_url=self.base, timeout=httpx.Timeout(60.0, read=None),
                                             # no keep-alive: llama-server's HTTP library drops idle pooled
                                             # connections under load, and a reused dead one fails the request
                                             limits=httpx.Limits(max_connections=4 * self.parallel + 16,
                                                                 max_keepalive_connections=0))
        return self._client

    def alive(self) -> bool:
        return self.process.poll() is None

    async def _post(self, route: str, payload: dict) -> dict:
        response = await self.client.post(route, json=payload)
        if 400 <= response.status_code < 500:  # the request's fault (a template that refuses the messages)
            from ftq.openai.schema import RequestError

            raise RequestError(f"{route.strip('/')}: {_message(response)}")
        if response.status_code != 200:
            raise EngineError(f"llama-server {route}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    async def chat_prompt(self, messages: list[dict]) -> str:
        return (await self._post("/apply-template", {"messages": messages}))["prompt"]

    async def tokenize(self, text: str, add_special: bool) -> list[int]:
        payload = {"content": text, "add_special": add_special, "parse_special": True}
        return (await self._post("/tokenize", payload))["tokens"]

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self._post("/detokenize", {"tokens": tokens}))["content"]

    async def tokenizer_info(self) -> dict:
        if self._info is None:
            props = (await self.client.get("/props")).json()
            meta = (await self.client.get("/v1/models")).json()["data"][0].get("meta") or {}
            self._info = {"eos_token": props.get("eos_token"), "bos_token": props.get("bos_token"),
                          "pad_token": None, "chat_template": props.get("chat_template"),
                          "model_max_length": self.context_length, "vocab_size": meta.get("n_vocab")}
        return self._info

    async def generate(self, prompt: list[int], settings: Settings) -> AsyncIterator[Piece]:
        payload = {"prompt": prompt, "n_predict": settings.max_tokens, "stream": True, "cache_prompt": True,
                   # OpenAI's sampling: temperature and top_p alone (llama-server adds top_k 40, min_p 0.05)
                   "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0, "min_p": 0.0,
                   "stop": list(settings.stop), "ignore_eos": settings.ignore_eos}
        if settings.seed is not None:
            payload["seed"] = settings.seed
        async with self.client.stream("POST", "/completion", json=payload) as response:
            if response.status_code != 200:
                raise EngineError(f"llama-server /completion: HTTP {response.status_code}: "
                                  f"{(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = orjson.loads(line[6:])
                if "error" in data:
                    raise EngineError(f"llama-server: {data['error']}")
                if data.get("stop"):
                    finish = "length" if data.get("stop_type") == "limit" else "stop"
                    yield Piece(data.get("content") or "", int(data.get("tokens_predicted", 0)), finish)
                    return
                if data.get("content"):
                    yield Piece(data["content"], int(data.get("tokens_predicted", 0)))
        raise EngineError("llama-server closed the stream before the answer finished")

    def close(self) -> None:
        stop_group(self.process)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def _message(response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:300]

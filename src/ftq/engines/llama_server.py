"""llama.cpp's own `llama-server` as the GGUF engine: continuous batching over `parallel` slots, each
request with its own sampling and seed, in the C++ engine at full speed. ftq keeps the gateway
(registry, validation, limits, API key, metrics) and talks to it on a Unix socket in a private 0700
folder, with a random key that only the gateway knows (given through the child's environment, never its
command line, which every local user can read in /proc): no other process can call the engine around
the gateway's key and limits. Chat
templates through its /apply-template, tokens through /tokenize, generation through /completion with
token-id prompts. Closing a stream closes the connection, and llama-server cancels the task at once.

The binary is built by `make install` from the sources vendored in the llama-cpp-python sdist (the
same llama.cpp as the runtime) and installed next to the venv's python; $FTQ_LLAMA_SERVER overrides."""

from __future__ import annotations

import http.client
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import AsyncIterator

import orjson

from ftq.engines import EngineError, Piece, Sampling
from ftq.errors import UsageError
from ftq.processes import describe_exit, log_tail, stop_group
from ftq.runtimes import gpu_layers

START_TIMEOUT = 600  # seconds: a 70B GGUF takes a while to map
JSON = {"Content-Type": "application/json"}


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


class LlamaServerEngine:
    kind = "llama-server"

    def __init__(self, path: Path, threads: int | None, n_ctx: int, parallel: int):
        from ftq.runtimes import default_threads

        self.path = Path(path)
        self.parallel = parallel
        self.context_length = n_ctx
        self.threads = threads or default_threads()
        # a folder only this user can enter: the socket in it is out of other users' reach; short, as a
        # socket path must fit in 108 bytes
        self.folder = Path(tempfile.mkdtemp(prefix="ftq-engine-", dir="/tmp"))
        self.socket = str(self.folder / "engine.sock")  # llama-server listens on a Unix socket for a .sock host
        self.key = secrets.token_urlsafe(32)
        self.log = tempfile.NamedTemporaryFile(prefix="ftq-llama-server-", suffix=".log", delete=False)
        command = [str(binary()), "--model", str(self.path), "--host", self.socket,
                   "--threads", str(self.threads), "--threads-batch", str(self.threads),
                   "--parallel", str(parallel), "--ctx-size", str(n_ctx * parallel), "--cont-batching",
                   "--threads-http", str(parallel + 4), "--no-webui", "--jinja", "--alias", self.path.stem,
                   # every layer on the GPU with a CUDA build (built from the same sources as the wheel)
                   "--n-gpu-layers", str(999 if gpu_layers() < 0 else gpu_layers())]
        self._session = None
        self._info = None
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=engine_environment(self.key), start_new_session=True,
                                        preexec_fn=die_with_parent)
        try:
            self._wait_healthy()
        except RuntimeError as exc:
            self.close()
            raise UsageError(f"{self.path}: llama-server did not start: {exc}") from exc

    def _wait_healthy(self) -> None:
        """Until the engine answers /health on its socket; an exit or the timeout is an error quoting its log."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.redact(f"{describe_exit(self.process.returncode)}{log_tail(self.log.name)}"))
            if unix_get(self.socket, "/health") == 200:
                return
            time.sleep(0.2)
        raise RuntimeError(self.redact(f"no answer within {START_TIMEOUT} s{log_tail(self.log.name)}"))

    def redact(self, text: str) -> str:
        """Where the engine listens and its key stay out of messages that reach clients (its log names its socket)."""
        return text.replace(self.socket, "<engine socket>").replace(self.key, "<engine key>")

    async def warm_up(self) -> None:
        """One tiny request through every engine call, so the first client doesn't pay for imports and connections."""
        prompt = await self.tokenize(await self.chat_prompt([{"role": "user", "content": "Hi"}]), False)
        async for _ in self.generate(prompt, Sampling(max_tokens=1, temperature=0.0)):
            pass

    @property
    def session(self):
        import aiohttp

        if self._session is None:  # made in the serving event loop, on first use
            # aiohttp parses HTTP in C (llhttp): the gateway reads one event per token per client. No
            # keep-alive: llama-server's HTTP library drops idle pooled connections under load, and a reused
            # dead one fails the request
            connector = aiohttp.UnixConnector(self.socket, limit=4 * self.parallel + 16, force_close=True)
            self._session = aiohttp.ClientSession("http://engine", connector=connector,
                                                  headers={"Authorization": f"Bearer {self.key}"},
                                                  timeout=aiohttp.ClientTimeout(total=None, connect=60))
        return self._session

    def alive(self) -> bool:
        return self.process.poll() is None

    async def death(self, exc: Exception) -> EngineError:
        """A request that failed on the connection: if the engine died (SIGILL on a CPU feature the build
        uses, the OOM killer), say so, with its log, instead of the connection error."""
        import asyncio

        for _ in range(20):  # the connection drops a moment before the kernel reaps the process
            if not self.alive():
                return EngineError(self.redact(f"llama-server (the engine serving {self.path.name}) "
                                               f"{describe_exit(self.process.returncode)}{log_tail(self.log.name)}"))
            await asyncio.sleep(0.05)
        return EngineError(self.redact(f"llama-server: {type(exc).__name__}: {exc}"))

    async def _post(self, route: str, payload: dict) -> dict:
        import aiohttp

        try:
            async with self.session.post(route, data=orjson.dumps(payload), headers=JSON) as response:
                body = await response.read()
        except aiohttp.ClientError as exc:
            raise await self.death(exc) from exc
        if 400 <= response.status < 500:  # the request's fault (a template that refuses the messages)
            from ftq.openai.schema import RequestError

            raise RequestError(f"{route.strip('/')}: {_message(body)}")
        if response.status != 200:
            raise EngineError(f"llama-server {route}: HTTP {response.status}: {body[:300]!r}")
        return orjson.loads(body)

    async def _get(self, route: str) -> dict:
        import aiohttp

        try:
            async with self.session.get(route) as response:
                return orjson.loads(await response.read())
        except aiohttp.ClientError as exc:
            raise await self.death(exc) from exc

    async def chat_prompt(self, messages: list[dict]) -> str:
        return (await self._post("/apply-template", {"messages": messages}))["prompt"]

    async def tokenize(self, text: str, add_special: bool) -> list[int]:
        payload = {"content": text, "add_special": add_special, "parse_special": True}
        return (await self._post("/tokenize", payload))["tokens"]

    async def detokenize(self, tokens: list[int]) -> str:
        return (await self._post("/detokenize", {"tokens": tokens}))["content"]

    async def tokenizer_info(self) -> dict:
        if self._info is None:
            props = await self._get("/props")
            meta = (await self._get("/v1/models"))["data"][0].get("meta") or {}
            self._info = {"eos_token": props.get("eos_token"), "bos_token": props.get("bos_token"),
                          "pad_token": None, "chat_template": props.get("chat_template"),
                          "model_max_length": self.context_length, "vocab_size": meta.get("n_vocab")}
        return self._info

    async def generate(self, prompt: list[int], sampling: Sampling) -> AsyncIterator[Piece]:
        payload = {"prompt": prompt, "n_predict": sampling.max_tokens, "stream": True, "cache_prompt": True,
                   # OpenAI's sampling: temperature and top_p alone (llama-server adds top_k 40, min_p 0.05).
                   # Greedy is the argmax, which top_k 1 finds in one pass; top_k 0 would have every step
                   # sort the whole vocabulary (7-10 % of decode speed measured on 2 cores)
                   "temperature": sampling.temperature, "top_p": sampling.top_p,
                   "top_k": 1 if sampling.temperature == 0 else 0, "min_p": 0.0,
                   "stop": list(sampling.stop), "ignore_eos": sampling.ignore_eos}
        if sampling.seed is not None:  # llama-server's seed is 32 bits (-1, i.e. 2**32 - 1, is "random")
            payload["seed"] = sampling.seed % 2 ** 32
        import aiohttp

        try:
            async with self.session.post("/completion", data=orjson.dumps(payload), headers=JSON) as response:
                if response.status != 200:
                    raise EngineError(f"llama-server /completion: HTTP {response.status}: {(await response.read())[:300]!r}")
                async for line in response.content:  # one server-sent event per line
                    if not line.startswith(b"data: "):
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
        except aiohttp.ClientError as exc:
            raise await self.death(exc) from exc
        if not self.alive():
            raise await self.death(EngineError("stream closed"))
        raise EngineError("llama-server closed the stream before the answer finished")

    def close(self) -> None:
        if self._session is not None:  # no pooled connections to close (force_close); callable from any thread
            self._session.detach()
        stop_group(self.process)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)


def engine_environment(key: str) -> dict[str, str]:
    """The engine's environment: ftq's own (CUDA, OMP settings), its key as LLAMA_API_KEY (llama-server
    reads it there like --api-key), and not the gateway's client key, which the engine has no use for."""
    from ftq.serve import API_KEY_ENV

    return {**{k: v for k, v in os.environ.items() if k != API_KEY_ENV}, "LLAMA_API_KEY": key}


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("engine", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def unix_get(path: str, route: str, headers: dict | None = None, timeout: float = 2.0) -> int | None:
    """The status of a GET on a Unix-socket HTTP server; None when nothing answers."""
    connection = UnixConnection(path, timeout)
    try:
        connection.request("GET", route, headers=headers or {})
        return connection.getresponse().status
    except OSError:
        return None
    finally:
        connection.close()


def _message(body: bytes) -> str:
    try:
        return str(orjson.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")

"""The model `ftq serve` serves: its engine, its in-process runtime for exact logprobs, and the swap to a
new version when `--watch` sees the registry alias move, with one model in memory at a time
(`ftq.serve.swap`): requests during the swap get 503 with Retry-After."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from ftq.registry.resolve import Resolved, fetch, lookup, resolve
from ftq.serve import CTX_SIZE, PARALLEL
from ftq.serve.swap import Occupancy, Swapping, hold

log = logging.getLogger(__name__)
DRAIN_SECONDS = 600  # how long a swap waits for requests on the old model before stopping it anyway


@dataclass
class Served:
    """One loaded version: its engine, and what is loaded beside it on first use."""

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

    def __init__(self, model_uri: str, params: dict | None = None, threads: int | None = None, n_ctx: int = CTX_SIZE,
                 parallel: int = PARALLEL):
        self.model_uri = model_uri
        self.params = params
        self.threads = threads
        self.n_ctx = n_ctx
        self.parallel = parallel
        self.occupancy = Occupancy()
        self.load_seconds = 1.0
        self.served: Served | None = self._load(resolve(model_uri, params))

    def _load(self, resolved: Resolved) -> Served:
        from ftq.engines import open_engine
        from ftq.runtimes import artifact_format

        log.info("loading %s (%s)", resolved.path, resolved.model_uri)
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
        found = lookup(self.model_uri, self.params)  # one registry call; download and verify only on a move
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
                log.exception("swap: %s did not start; serving %s again", resolved.model_uri, old.resolved.model_uri)
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

"""`ftq serve`: bind, check the API-key rule, optionally watch the registry alias, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading

from ftq.errors import UsageError
from ftq.openai.schema import Limits
from ftq.serve import CTX_SIZE, MAX_QUEUED, PARALLEL
from ftq.serve.app import ModelHost, create_app

log = logging.getLogger(__name__)
API_KEY_ENV = "FTQ_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(reference: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          watch: float = 0.0, params: dict | None = None, limits: Limits | None = None, threads: int | None = None,
          parallel: int = PARALLEL, max_queued: int = MAX_QUEUED, n_ctx: int = CTX_SIZE) -> None:
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not api_key:
        raise UsageError(f"binding {host} exposes the model beyond this machine: set --api-key or ${API_KEY_ENV}")
    model_host = ModelHost(reference, params, threads=threads, n_ctx=n_ctx, parallel=parallel)
    app = create_app(model_host, api_key, limits, max_queued)
    stop = threading.Event()
    if watch > 0:
        threading.Thread(target=model_host.watch, args=(watch, stop), daemon=True).start()
    resolved = model_host.served.resolved
    log.info("serving %s (version %s, alias %s) via %s, %d sequences at once, on http://%s:%d", resolved.name,
             resolved.version, resolved.alias, model_host.served.engine.kind, parallel, host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        stop.set()

"""`ftq serve`: bind, check the API-key rule, optionally watch the registry alias, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
import threading

from ftq.errors import UsageError
from ftq.serve.app import Limits, ModelHost, create_app

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
          watch: float = 0.0, params: dict | None = None, limits: Limits | None = None, threads: int | None = None) -> None:
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not api_key:
        raise UsageError(f"binding {host} exposes the model beyond this machine: set --api-key or ${API_KEY_ENV}")
    model_host = ModelHost(reference, params, threads=threads)
    app = create_app(model_host, api_key, limits)
    stop = threading.Event()
    if watch > 0:
        threading.Thread(target=model_host.watch, args=(watch, stop), daemon=True).start()
    health = model_host.health()
    log.info("serving %s (version %s, alias %s, %s via %s) on http://%s:%d", health["model"], health["version"],
             health["alias"], health["format"], health["runtime"], host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        stop.set()

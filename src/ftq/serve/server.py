"""`ftq serve`: bind, check the API-key rule, optionally watch the registry alias, run uvicorn.

The key comes from $FTQ_API_KEY or a file (`--api-key-file`): a command line is readable by every local
user (/proc/PID/cmdline, `ps`). `--api-key` still works, for scripts that use it, with a warning saying
so; refusing it would break them, and on a single-user machine it exposes nothing."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import threading
from pathlib import Path

from ftq.errors import UsageError
from ftq.openai.schema import Limits
from ftq.serve import API_KEY_ENV, CTX_SIZE, MAX_QUEUED, PARALLEL
from ftq.serve.app import create_app
from ftq.serve.guard import Policy
from ftq.serve.host import ModelHost

log = logging.getLogger(__name__)
COMMAND_LINE_KEY = (f"--api-key on the command line is visible to every user of this machine (/proc/PID/cmdline, "
                    f"ps); set ${API_KEY_ENV} or use --api-key-file instead")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_of(flag: str | None, file: str | None, environ=os.environ) -> str | None:
    """The key from --api-key-file, --api-key (warned about by the caller) or $FTQ_API_KEY, in that order;
    an unreadable or empty file is an error, not a server without a key."""
    if flag and file:
        raise UsageError("give the API key one way: --api-key-file or --api-key, not both")
    if file:
        return key_file(Path(file))
    return flag or environ.get(API_KEY_ENV) or None


def key_file(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"--api-key-file {path}: {exc.strerror}") from exc
    if not key or "\n" in key:
        raise UsageError(f"--api-key-file {path}: must hold the key alone, on one line")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("--api-key-file %s is readable by other users: chmod 600 it", path)
    return key


def serve(model_uri: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          watch: float = 0.0, params: dict | None = None, limits: Limits | None = None, threads: int | None = None,
          parallel: int = PARALLEL, max_queued: int = MAX_QUEUED, n_ctx: int = CTX_SIZE,
          policy: Policy | None = None) -> None:
    """`api_key`: already read (`api_key_of`); None falls back to $FTQ_API_KEY."""
    import uvicorn

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(host) and not api_key:
        raise UsageError(f"binding {host} exposes the model beyond this machine: set ${API_KEY_ENV} or "
                         f"--api-key-file (--api-key works but is visible in /proc)")
    model_host = ModelHost(model_uri, params, threads=threads, n_ctx=n_ctx, parallel=parallel)
    app = create_app(model_host, api_key, limits, max_queued, policy or Policy.for_bind(host))
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

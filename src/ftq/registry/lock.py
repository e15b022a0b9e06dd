"""Compare-and-set on the MLflow registry, which has none of its own: `set_registered_model_alias`
overwrites whatever is there, so two `promote` runs that read the champion at the same time could each
move it, and the later write wins even when it is the worse build.

The lock is a registered model named `<model>.lock`: creating a registered model is atomic in every
MLflow store (a unique name; the second creator gets RESOURCE_ALREADY_EXISTS), on a sqlite file as on a
tracking server over PostgreSQL. Its tags say who holds it (host, pid) and when it last renewed it: a
heartbeat thread rewrites that time every `stale_after / 4` seconds while the block runs, however long
(an upload, a champion re-evaluation). A holder whose heartbeat is older than `stale_after`, or whose
pid is gone on this same host (killed), is dead and its lock is broken; a live holder never is. Inside
the lock, `compare_and_set_alias` moves an alias only if it still points where the caller read it;
otherwise the caller re-reads and decides again (retry on conflict).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

log = logging.getLogger(__name__)

OWNER_TAG = "ftq.lock.owner"
SINCE_TAG = "ftq.lock.since"
HEARTBEAT_TAG = "ftq.lock.heartbeat"  # the holder's last renewal (epoch seconds)
HOST_TAG = "ftq.lock.host"
PID_TAG = "ftq.lock.pid"
STALE_AFTER = 600.0
# a waiter gives up after this long; the holder is alive all along (a dead one is broken long before)
WAIT = 3600.0


class RegistryBusy(RuntimeError):
    """The registry lock stayed taken for longer than the caller would wait."""


@dataclass(frozen=True)
class Holder:
    owner: str
    host: str
    pid: int | None
    heartbeat: float


def lock_name(model_name: str) -> str:
    return f"{model_name}.lock"


def holder_of(tags: dict) -> Holder:
    """The holder its tags describe; a lock written before heartbeats existed counts from its `since`."""
    def number(key: str) -> float | None:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return None

    pid = number(PID_TAG)
    heartbeat = number(HEARTBEAT_TAG)
    return Holder(tags.get(OWNER_TAG, "?"), tags.get(HOST_TAG, ""), int(pid) if pid is not None else None,
                  heartbeat if heartbeat is not None else number(SINCE_TAG) or 0.0)


def stale_reason(holder: Holder, now: float, stale_after: float, host: str,
                 alive: Callable[[int], bool]) -> str | None:
    """Why `holder` is dead (its lock may be broken), or None while it is alive."""
    if holder.host == host and holder.pid is not None and not alive(holder.pid):
        return f"its process {holder.pid} on this host ({host}) is gone"
    if now - holder.heartbeat > stale_after:
        return f"no heartbeat for {now - holder.heartbeat:.0f} s (limit {stale_after:g} s)"
    return None


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


@contextlib.contextmanager
def registry_lock(client, model_name: str, wait: float = WAIT, stale_after: float = STALE_AFTER,
                  heartbeat: float | None = None) -> Iterator[str]:
    """Hold `<model_name>.lock` for the block, renewing it every `heartbeat` seconds (default
    stale_after / 4); yields the owner string."""
    name = lock_name(model_name)
    owner = _acquire(client, name, model_name, wait, stale_after)
    stop = threading.Event()
    renewer = threading.Thread(target=_renew, args=(client, name, owner, heartbeat or stale_after / 4, stop),
                               name=f"heartbeat {name}", daemon=True)
    renewer.start()
    try:
        yield owner
    finally:
        stop.set()
        renewer.join()
        _delete_if_owned(client, name, owner)


def _acquire(client, name: str, model_name: str, wait: float, stale_after: float) -> str:
    from mlflow.exceptions import MlflowException

    from ftq.processes import pid_alive

    host, pid = socket.gethostname(), os.getpid()
    owner = f"{host}:{pid}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    announced = False
    while True:
        now = f"{time.time():.3f}"
        try:
            client.create_registered_model(
                name, tags={OWNER_TAG: owner, SINCE_TAG: now, HEARTBEAT_TAG: now, HOST_TAG: host, PID_TAG: str(pid)},
                description=f"held by ftq while it writes to the registry of {model_name}; deleted when it finishes")
            return owner
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in _code(exc) and "RESOURCE_DOES_NOT_EXIST" not in _code(exc):
                raise
        holder = _holder(client, name)
        why = holder and stale_reason(holder, time.time(), stale_after, host, pid_alive)
        if why:
            log.warning("breaking the registry lock %s held by %s: %s", name, holder.owner, why)
            _delete_if_owned(client, name, holder.owner)
            continue
        if time.monotonic() > deadline:
            raise RegistryBusy(f"the registry lock {name} is held by {holder.owner if holder else 'another process'}, "
                               f"which is alive (it renews the lock); waited {wait:.0f} s")
        if not announced and holder is not None:
            log.info("waiting for the registry lock %s (held by %s)", name, holder.owner)
            announced = True
        time.sleep(0.2 + random.random() * 0.3)


def _renew(client, name: str, owner: str, every: float, stop: threading.Event) -> None:
    """The heartbeat: while the block runs, rewrite the lock's heartbeat time so that no waiter takes
    a long-running holder for a dead one. A failed write is retried at the next beat (well within
    stale_after); a lock found taken by someone else means ours was broken, and renewing stops."""
    while not stop.wait(every):
        try:
            holder = _holder(client, name)
            if holder is None or holder.owner != owner:
                log.error("the registry lock %s is no longer held by %s (broken as stale?): writes made under it "
                          "are no longer exclusive", name, owner)
                return
            client.set_registered_model_tag(name, HEARTBEAT_TAG, f"{time.time():.3f}")
        except Exception as exc:  # a busy store: the next beat tries again
            log.warning("could not renew the registry lock %s: %s", name, exc)


def _holder(client, name: str) -> Holder | None:
    try:
        return holder_of(client.get_registered_model(name).tags)
    except Exception:  # released meanwhile
        return None


def _delete_if_owned(client, name: str, owner: str) -> None:
    holder = _holder(client, name)
    if holder is not None and holder.owner == owner:
        with contextlib.suppress(Exception):  # already gone
            client.delete_registered_model(name)


def current_alias(client, model_name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except Exception:  # no such alias
        return None


def compare_and_set_alias(client, model_name: str, alias: str, expected: str | None, new: str) -> bool:
    """Point `alias` at version `new` if it still points at `expected` (None: unset). Call it while
    holding `registry_lock`, which every ftq writer takes; the re-read also catches a move made by
    hand in the MLflow UI since the caller read the alias."""
    if current_alias(client, model_name, alias) != expected:
        return False
    client.set_registered_model_alias(model_name, alias, new)
    return True

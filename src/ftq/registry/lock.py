"""Compare-and-set on the MLflow registry, which has none of its own: `set_registered_model_alias`
overwrites whatever is there, so two `promote` runs that read the champion at the same time could each
move it, and the later write wins even when it is the worse build.

The lock is a registered model named `<model>.lock`: creating a registered model is atomic in every
MLflow store (a unique name; the second creator gets RESOURCE_ALREADY_EXISTS), on a sqlite file as on a
tracking server over PostgreSQL. Its tags say who holds it and since when; a lock older than
`stale_after` seconds (its holder was killed) is broken. Inside the lock, `compare_and_set_alias`
moves an alias only if it still points where the caller read it; otherwise the caller re-reads and
decides again (retry on conflict).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import time
import uuid
from typing import Iterator

log = logging.getLogger(__name__)

OWNER_TAG = "ftq.lock.owner"
SINCE_TAG = "ftq.lock.since"


class RegistryBusy(RuntimeError):
    """The registry lock stayed taken for longer than the caller would wait."""


def lock_name(model_name: str) -> str:
    return f"{model_name}.lock"


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


@contextlib.contextmanager
def registry_lock(client, model_name: str, wait: float = 600.0, stale_after: float = 600.0) -> Iterator[str]:
    """Hold `<model_name>.lock` for the block; yields the owner string."""
    from mlflow.exceptions import MlflowException

    name = lock_name(model_name)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    announced = False
    while True:
        try:
            client.create_registered_model(name, tags={OWNER_TAG: owner, SINCE_TAG: f"{time.time():.3f}"},
                                           description=f"held by ftq promote while it moves aliases of {model_name}; "
                                                       "deleted when it finishes")
            break
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in _code(exc) and "RESOURCE_DOES_NOT_EXIST" not in _code(exc):
                raise
        holder = _holder(client, name)
        if holder is not None and time.time() - holder[1] > stale_after:
            log.warning("breaking the registry lock %s held by %s since %.0f s ago (stale)", name, holder[0],
                        time.time() - holder[1])
            _delete_if_owned(client, name, holder[0])
            continue
        if time.monotonic() > deadline:
            raise RegistryBusy(f"the registry lock {name} is held by {holder[0] if holder else 'another process'}; "
                               f"waited {wait:.0f} s (delete the registered model {name} if no promote is running)")
        if not announced and holder is not None:
            log.info("waiting for the registry lock %s (held by %s)", name, holder[0])
            announced = True
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield owner
    finally:
        _delete_if_owned(client, name, owner)


def _holder(client, name: str) -> tuple[str, float] | None:
    try:
        tags = client.get_registered_model(name).tags
    except Exception:  # released meanwhile
        return None
    try:
        return tags.get(OWNER_TAG, "?"), float(tags.get(SINCE_TAG, "0"))
    except ValueError:
        return tags.get(OWNER_TAG, "?"), 0.0


def _delete_if_owned(client, name: str, owner: str) -> None:
    holder = _holder(client, name)
    if holder is not None and holder[0] == owner:
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

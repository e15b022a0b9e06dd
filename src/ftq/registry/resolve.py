"""`models:/NAME@alias`, `models:/NAME/N` or a local path -> a verified local artifact to load.

A registry version is looked up (`lookup`, one registry call: cheap enough to poll for `--watch`),
then fetched (`fetch`): its logged model is downloaded from MLflow's artifact store into a cache
keyed by the model's sha256 (`$FTQ_CACHE/registry/<sha256>`, default ~/.cache/ftq), and every file
is checked against the sha256 the version's tags recorded, on every load, cached or not. Any
difference (a missing, extra or changed file) refuses the load. Nothing here reads the working tree,
so a registry version deploys on any machine that reaches the tracking server.

A download goes into `<sha256>.tmp-<pid>-*` beside its cache entry; what a killed download leaves (its
pid is dead, or the folder is older than `LEFTOVER_MAX_AGE`) is swept on the next fetch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ftq.errors import UsageError
from ftq.registry import BUILD_DIR, FILES_TAG, MODEL_TAG, differences, digest, file_hashes

log = logging.getLogger(__name__)

# a download folder older than this is abandoned even if a process with its pid runs (the pid was reused)
LEFTOVER_MAX_AGE = 24 * 3600.0
URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


class VerificationError(UsageError):
    """Downloaded bytes differ from what the registry version recorded."""


@dataclass(frozen=True)
class Resolved:
    model_uri: str
    path: Path                  # the model file or folder a runtime opens
    name: str
    version: str | None = None
    alias: str | None = None
    sha256: str | None = None   # the logged model's sha256 (registry versions only)


@dataclass(frozen=True)
class Found:
    """A registry version, not yet downloaded."""
    model_uri: str
    name: str
    version: str
    alias: str | None
    tags: dict


def cache_root() -> Path:
    if os.environ.get("FTQ_CACHE"):
        return Path(os.environ["FTQ_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ftq"


def resolve(model_uri: str, params: dict | None = None) -> Resolved:
    match = URI.match(model_uri)
    if not match:
        path = Path(model_uri).expanduser().resolve()
        if not path.exists():
            raise UsageError(f"--model {model_uri}: no such file or folder, and not a models:/NAME@alias URI")
        return Resolved(model_uri, path, path.parent.name if path.is_file() else path.name)
    return fetch(lookup(model_uri, params), params)


def lookup(model_uri: str, params: dict | None = None) -> Found:
    match = URI.match(model_uri)
    if not match:
        raise UsageError(f"{model_uri}: not a models:/NAME@alias or models:/NAME/VERSION URI")
    client = registry_client(params)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as exc:  # MlflowException: unknown model, alias or version; unreachable server
        raise UsageError(f"--model {model_uri}: {getattr(exc, 'message', exc)}") from exc
    return Found(model_uri, name, str(found.version), alias, dict(found.tags))


def registry_client(params: dict | None):
    from ftq.tracking import client

    # outside a project (no params.yaml) there is no default store to fall back on
    if not os.environ.get("MLFLOW_TRACKING_URI") and not ((params or {}).get("tracking") or {}).get("uri") \
            and not (params or {}).get("_path"):
        raise UsageError("no tracking server: set MLFLOW_TRACKING_URI (or run inside an ftq project, whose "
                         "store is its mlflow.db)")
    return client(params)


def expected_files(found: Found) -> dict[str, str]:
    where = f"{found.model_uri} (version {found.version})"
    if FILES_TAG not in found.tags or MODEL_TAG not in found.tags:
        raise VerificationError(f"{where}: the version has no {FILES_TAG}/{MODEL_TAG} tags, so its bytes cannot be "
                                "verified; it was not registered by this ftq (run `ftq promote` to register the build "
                                "again from the artifact store)")
    files = json.loads(found.tags[FILES_TAG])
    if digest(files) != found.tags[MODEL_TAG]:
        raise VerificationError(f"{where}: tag {FILES_TAG} does not hash to tag {MODEL_TAG}; the version's tags were "
                                "edited")
    return files


def fetch(found: Found, params: dict | None = None) -> Resolved:
    files = expected_files(found)
    key = found.tags[MODEL_TAG]
    folder = cache_root() / "registry" / key
    sweep_leftovers(folder.parent)
    if folder.is_dir():
        verify(folder, files, found)
    else:
        download(found, files, folder, params)
    manifest = json.loads((folder / BUILD_DIR / "manifest.json").read_text())
    path = folder / BUILD_DIR / manifest.get("artifact", "")
    return Resolved(found.model_uri, path, found.name, found.version, found.alias, key)


def download(found: Found, files: dict[str, str], folder: Path, params: dict | None) -> None:
    """Into a temp folder beside the cache entry, verified, then renamed into place: a failed or
    interrupted download never leaves a cache entry behind."""
    import mlflow.artifacts

    from ftq.processes import owner_pid
    from ftq.tracking import tracking_uri

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-{owner_pid()}-", dir=folder.parent))
    try:
        client = registry_client(params)
        uri = client.get_model_version_download_uri(found.name, found.version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp),
                                                         tracking_uri=tracking_uri(params)))
        verify(local, files, found, fix="the artifact store does not hold what the version recorded")
        try:
            local.rename(folder)
        except OSError:  # another process finished the same download first
            if not folder.is_dir():
                raise
            verify(folder, files, found)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify(folder: Path, files: dict[str, str], found: Found, fix: str | None = None) -> None:
    where = f"{found.model_uri} (version {found.version})"
    # MLflow's own loader (mlflow.pyfunc.load_model on models:/...) writes `registered_model_meta` into
    # a local artifact store's folder; it is MLflow's bookkeeping, not part of the build
    problems = differences(file_hashes(folder, skip=("registered_model_meta",)), files, "the registry")
    if problems:
        raise VerificationError(f"{where}: {folder} does not hold the registered bytes: {'; '.join(problems)}. "
                                f"Nothing was loaded. {fix or f'Delete {folder} to download the version again.'}")


def leftover_is_stale(name: str, age: float, max_age: float, alive: Callable[[int], bool]) -> bool:
    """Whether the download folder `<sha256>.tmp-<pid>-*` (`age` seconds old) was abandoned: its writer's
    pid is dead, or it is older than `max_age` (a pid reused since, or a name without one)."""
    pid = name.split(".tmp-", 1)[-1].split("-", 1)[0]
    return (pid.isdigit() and not alive(int(pid))) or age > max_age


def sweep_leftovers(root: Path, max_age: float = LEFTOVER_MAX_AGE) -> list[Path]:
    """Remove the abandoned download folders in the cache `root` (a SIGKILL skips download's cleanup)."""
    from ftq.processes import pid_alive

    swept = []
    for path in root.glob("*.tmp-*") if root.is_dir() else ():
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # its download just finished or failed
            continue
        if leftover_is_stale(path.name, age, max_age, pid_alive):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    if swept:
        log.warning("removed %d abandoned download(s) from %s: %s", len(swept), root,
                    ", ".join(p.name for p in swept))
    return swept

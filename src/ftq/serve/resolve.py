"""`models:/NAME@alias`, `models:/NAME/VERSION` or a local path -> the artifact to load, and what it is."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ftq.errors import UsageError

URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class Resolved:
    reference: str
    path: Path
    name: str
    version: str | None = None
    alias: str | None = None


def resolve(reference: str, params: dict | None = None) -> Resolved:
    match = URI.match(reference)
    if not match:
        path = Path(reference).expanduser().resolve()
        if not path.exists():
            raise UsageError(f"--model {reference}: no such file or folder, and not a models:/NAME@alias URI")
        return Resolved(reference, path, path.parent.name if path.is_file() else path.name)
    from ftq.tracking import client

    mlflow_client = client(params)
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        found = (mlflow_client.get_model_version_by_alias(name, alias) if alias
                 else mlflow_client.get_model_version(name, version))
    except Exception as exc:  # MlflowException: unknown model, alias or version
        raise UsageError(f"--model {reference}: {getattr(exc, 'message', exc)}") from exc
    path = Path(artifact_path(found.source))
    if not path.exists():
        raise UsageError(f"--model {reference}: version {found.version} points at {found.source}, which is missing "
                         f"(restore it with `dvc checkout` or `dvc pull`)")
    return Resolved(reference, path, name, str(found.version), alias)


def artifact_path(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source

"""params.yaml: loading, the repo root, flattening and hashing of a stage's block."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml


class ParamsError(ValueError):
    """A missing or invalid value in params.yaml."""


def repo_root(start: Path | None = None) -> Path:
    """The project root, where a stage reads its inputs and writes its outputs: the nearest folder up from
    the working directory with dvc.yaml or params.yaml. DVC runs each stage there, in the workspace it
    runs in: the project itself, or a temporary copy for `dvc exp run --temp` and queued experiments
    (whose $DVC_ROOT names the parent project instead: see store_root)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists() or (folder / "params.yaml").exists():
            return folder
    return here


def store_root() -> Path:
    """Where what every workspace shares lives (the MLflow store and its artifacts, the run log): the
    parent project ($DVC_ROOT) when DVC runs a stage in a temporary experiment workspace, so queued
    experiments log into the project's store rather than into a copy that DVC deletes; else repo_root."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return repo_root()


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    path = Path(path) if path else repo_root() / "params.yaml"
    if not path.exists():
        raise ParamsError(f"{path}: no such params file")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    params["_path"] = str(path.resolve())
    return params


def block(params: dict[str, Any], name: str) -> dict[str, Any]:
    """One stage's block of params.yaml; a missing block is an error naming the file."""
    value = params.get(name)
    if not isinstance(value, dict):
        raise ParamsError(f"{params.get('_path', 'params.yaml')}: missing block '{name}'")
    return value


def flatten(tree: dict[str, Any], prefix: str = "", lists_as_json: bool = True) -> dict[str, Any]:
    """{'lora': {'rank': 8}} -> {'lora.rank': 8}; lists stay whole, as JSON (so MLflow can show them)
    unless lists_as_json is False."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + ".", lists_as_json))
        elif lists_as_json and isinstance(value, (list, dict)):
            flat[name] = json.dumps(value, sort_keys=True)
        else:
            flat[name] = value
    return flat


def params_hash(tree: Any) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()[:16]

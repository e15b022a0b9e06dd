"""The MLflow model registry as the source of truth for deployment.

- `package`: a quantized build -> an MLflow model (pyfunc flavor over ftq's runtimes), logged into
  MLflow's artifact store as an MLflow 3 LoggedModel; a registry version is created from that copy.
- `resolve`: `models:/NAME@alias` / `models:/NAME/N` -> a local copy downloaded into a cache keyed
  by the model's sha256 and verified file by file against the version's tags before it is loaded.
- `pyfunc`: the loader MLflow calls for `mlflow.pyfunc.load_model` and `mlflow models serve`.
- `lock`: a registry-wide lock, so that concurrent `promote` runs move aliases by compare-and-set.
- `upload`: a build logged into the artifact store under the lock, read back and verified; an earlier
  upload of the same bytes that no version references is reused.
- `versions`: one registry version per distinct build, created from its upload, tagged and linked.
- `aliases`: the champion read, decided on and moved by compare-and-set (`challenger` beside it).
- `gc`: `ftq registry gc`, the versions and uploads no alias or recent build needs.

The tags below make a version verifiable: `versions` writes them, resolve checks the bytes against them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ftq.io import file_sha256

ARTIFACT_TAG = "ftq.artifact_sha256"  # the build's own files: one version per distinct build
MODEL_TAG = "ftq.model_sha256"        # every file of the logged MLflow model: the download cache key
FILES_TAG = "ftq.files"               # {"relative/path": sha256} of every file of the logged model
BUILD_DIR = "build"                   # where the build's files sit inside the logged model


def digest(files: dict[str, str]) -> str:
    """One sha256 for a set of files: of their sorted `path sha256` lines."""
    lines = "".join(f"{path} {sha}\n" for path, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def build_digest(manifest: dict) -> str:
    """The build's identity: its files as the quantize manifest lists them (manifest.json excluded)."""
    return digest({path: f["sha256"] for path, f in manifest["files"].items()})


def files_tag(files: dict[str, str]) -> str:
    return json.dumps(files, sort_keys=True, separators=(",", ":"))


def file_hashes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file below `folder` (relative POSIX path) -> its sha256."""
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in skip}


def differences(actual: dict[str, str], expected: dict[str, str], recorder: str) -> list[str]:
    """What keeps `actual` files from being the `expected` ones: missing, unexpected, changed."""
    problems = [f"missing {p}" for p in sorted(set(expected) - set(actual))]
    problems += [f"unexpected {p}" for p in sorted(set(actual) - set(expected))]
    problems += [f"{p} has sha256 {actual[p]}, {recorder} recorded {expected[p]}"
                 for p in sorted(set(actual) & set(expected)) if actual[p] != expected[p]]
    return problems

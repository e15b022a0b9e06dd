"""Stage `benchmark_data`: the local files of the standard benchmarks (`evaluate.lm_eval.local_data`),
recorded in data/benchmarks.json: each file's path, sha256, size, item count and the seeded sample of
items every candidate is scored on, or that it is absent and how to get it.

The files are not the project's (HellaSwag lies in ../shared/data here, in a download for a user), so
DVC cannot track them as ordinary dependencies: a missing one would stop the whole pipeline. Instead
this stage runs on every `dvc repro` (always_changed: reading and hashing the files is quick)
and its output changes only when a file does, so the evaluations that depend on it rerun exactly then.
It logs no MLflow run: it measures nothing; every evaluation's run records the entry it used."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ftq import schema
from ftq.evaluation.local_data import LocalTask, manifest_entry
from ftq.io import atomic_write_json
from ftq.params import repo_root

log = logging.getLogger(__name__)

MANIFEST = Path("data/benchmarks.json")


def local_tasks(params: dict[str, Any], root: Path) -> list[LocalTask]:
    cfg = schema.settings(params, "evaluate")["lm_eval"]["local_data"]
    return [LocalTask.from_settings(task, entry, root) for task, entry in sorted(cfg.items())]


def run(params: dict[str, Any]) -> dict[str, dict]:
    root = repo_root()
    entries = {local.task: manifest_entry(local) for local in local_tasks(params, root)}
    atomic_write_json(root / MANIFEST, entries)
    for task, entry in entries.items():
        if entry["present"]:
            log.info("%s: %s, %d items (%d sampled), sha256 %s", task, entry["path"], entry["items"],
                     len(entry["indices"]), entry["sha256"][:12])
        else:
            log.warning("%s: %s", task, entry["note"])
    return entries


def load(root: Path) -> dict[str, dict]:
    """data/benchmarks.json, as the benchmark_data stage wrote it."""
    import json

    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `dvc repro benchmark_data` (or `ftq benchmark-data`) first")
    return json.loads(path.read_text())

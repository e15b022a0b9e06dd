"""Trainer checkpoints a stage (train, preference) resumes from: kept only while they belong to the same
run (its fingerprint: params, data and base), so that a changed run never resumes another's state."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ftq.io import atomic_write_json

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"


def prepare_checkpoints(folder: Path, expected: dict[str, str]) -> str | None:
    """The checkpoint to resume from, or None. Checkpoints of a different run are removed."""
    marker = folder / FINGERPRINT_FILE
    if folder.exists():
        found = json.loads(marker.read_text()) if marker.exists() else None
        if found != expected:
            log.warning("checkpoints in %s belong to another run (params, data or base changed): removing", folder)
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, expected)
    complete = [
        p for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()
    ]
    if not complete:
        return None
    latest = max(complete, key=lambda p: int(p.name.split("-")[-1]))
    log.info("resuming from %s", latest)
    return str(latest)

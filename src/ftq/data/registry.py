"""The dataset registry, data/datasets.yaml (the role LLaMA-Factory's dataset_info.json plays):

    my_set:
      file: my_set.jsonl        # relative to the registry's folder; json, jsonl, csv or parquet
      format: sharegpt          # alpaca | sharegpt | openai
      columns: {messages: conversations, system: system, tools: tools}
      tags: {role_tag: from, content_tag: value, user_tag: human, assistant_tag: gpt}
      num_samples: 500          # optional: seeded subsample (or repeat) to this many records
      split: auto               # auto (seeded train/eval split) | train | eval
      ranking: true             # preference pairs: columns {messages, chosen, rejected} (ftq.data.preference);
                                # KTO's labelled answers name columns.kto_tag instead
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftq.data.formats import FormatSpec

SPLITS = ("auto", "train", "eval")
KEYS = {"file", "format", "columns", "tags", "num_samples", "split", "description", "ranking"}


class RegistryError(ValueError):
    pass


@dataclass
class DatasetSpec:
    name: str
    file: Path
    format: FormatSpec
    num_samples: int | None = None
    split: str = "auto"


def load_registry(path: str | Path) -> dict[str, DatasetSpec]:
    path = Path(path)
    if not path.exists():
        raise RegistryError(f"{path}: no such dataset registry")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RegistryError(f"{path}: expected a mapping of dataset names")
    return {name: _entry(path, name, entry) for name, entry in raw.items()}


def _entry(path: Path, name: str, entry: Any) -> DatasetSpec:
    where = f"{path}: dataset '{name}': "
    if not isinstance(entry, dict):
        raise RegistryError(f"{where}expected a mapping")
    unknown = set(entry) - KEYS
    if unknown:
        raise RegistryError(f"{where}unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(KEYS))})")
    if not entry.get("file"):
        raise RegistryError(f"{where}field 'file': missing")
    try:
        ranking = entry.get("ranking", False)
        if not isinstance(ranking, bool):
            raise RegistryError(f"{where}field 'ranking': expected true or false, got {ranking!r}")
        fmt = FormatSpec.build(entry.get("format", "alpaca"), entry.get("columns"), entry.get("tags"), where, ranking)
    except ValueError as exc:
        raise RegistryError(str(exc)) from exc
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples <= 0):
        raise RegistryError(f"{where}field 'num_samples': expected a positive integer, got {num_samples!r}")
    split = entry.get("split", "auto")
    if split not in SPLITS:
        raise RegistryError(f"{where}field 'split': expected one of {', '.join(SPLITS)}, got {split!r}")
    file = Path(entry["file"]).expanduser()
    if not file.is_absolute():
        file = (path.parent / file).resolve()
    return DatasetSpec(name, file, fmt, num_samples, split)


def select(registry: dict[str, DatasetSpec], names: list[str], registry_path: str | Path) -> list[DatasetSpec]:
    missing = [n for n in names if n not in registry]
    if missing:
        raise RegistryError(
            f"{registry_path}: no dataset named {', '.join(map(repr, missing))} (known: {', '.join(registry)})"
        )
    return [registry[n] for n in names]


def sample(conversations: list[dict], num_samples: int | None, rng: random.Random) -> list[dict]:
    """LLaMA-Factory's num_samples: a seeded subset, or whole repeats plus a seeded remainder."""
    if not num_samples or num_samples == len(conversations) or not conversations:
        return conversations
    repeats, remainder = divmod(num_samples, len(conversations))
    return conversations * repeats + rng.sample(conversations, remainder)

"""Calibration and held-out token sequences, taken from the project's own prepared data."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sequences:
    split: str
    ids: list[list[int]] = field(repr=False)
    # per sequence, which tokens are scored (the answers: labels != -100); None scores every token
    targets: list[list[bool]] | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.ids)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()

    def describe(self) -> dict:
        return {"split": self.split, "samples": len(self.ids), "tokens": self.tokens, "sha256": self.sha256}


def load_split(root: Path, split: str):
    from datasets import load_from_disk

    folder = root / "data" / "processed" / split
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no prepared {split} split; run `dvc repro prepare` first")
    return load_from_disk(str(folder))


def sample(root: Path, split: str, count: int, max_length: int, seed: int | None = 0, min_length: int = 2) -> Sequences:
    """`count` examples of a split (shuffled with `seed`, or the first ones if seed is None), each cut to
    `max_length` tokens. Chat-formatted examples, so calibration sees the prompts the model will get."""
    rows = load_split(root, split)
    order = list(range(len(rows)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    ids, targets = [], []
    for index in order:
        seq = list(rows[index]["input_ids"])[:max_length]
        labels = list(rows[index]["labels"])[:max_length] if "labels" in rows.column_names else None
        if len(seq) >= min_length:
            ids.append(seq)
            targets.append([label != -100 for label in labels] if labels is not None else [True] * len(seq))
        if len(ids) == count:
            break
    if not ids:
        raise ValueError(f"data/processed/{split}: no usable examples for calibration")
    return Sequences(split, ids, targets)


def heldout(root: Path, count: int, max_length: int, seed: int | None = None) -> Sequences:
    """Examples of the eval split (the train split when there is none): the first ones, or a sample
    shuffled with `seed`, with their answer tokens marked: perplexity there measures what fine-tuning
    taught, not how the prompts read."""
    split = "eval" if (root / "data" / "processed" / "eval").exists() else "train"
    return sample(root, split, count, max_length, seed=seed)

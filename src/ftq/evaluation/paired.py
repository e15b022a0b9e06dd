"""Paired comparisons of two candidates scored on the same examples: the difference of their means and
the ratio of their means, each with a seeded percentile-bootstrap interval that resamples examples (the
same examples for both sides, so what the two share, e.g. hard examples, cancels out).

Used by `promote`: a candidate beats the champion only when the interval of the difference lies above 0,
and retention against merged is a ratio with its interval."""

from __future__ import annotations

import json
from pathlib import Path

BOOTSTRAP_SAMPLES = 4000


class PairingError(ValueError):
    """The two sides were not scored on the same examples."""


def load_scores(path: Path) -> dict[str, dict]:
    """Per-example rows of reports/eval/<candidate>.answers.jsonl, by example id."""
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "id" not in row:
                raise PairingError(f"{path}: line {number}: no field 'id'")
            rows[row["id"]] = row
    return rows


def pair(a: dict[str, dict], b: dict[str, dict], key: str, where: str) -> tuple[list[float], list[float]]:
    """The values of `key` for the examples both sides scored; the example sets must be equal."""
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
        raise PairingError(f"{where}: not scored on the same examples (only in one: {only_a}, only in the other: "
                           f"{only_b}); evaluate both on the current set")
    ids = sorted(i for i in a if key in a[i])
    if not ids or any(key not in b[i] for i in ids):
        raise PairingError(f"{where}: field '{key}' is missing from the per-example scores")
    return [float(a[i][key]) for i in ids], [float(b[i][key]) for i in ids]


def _resamples(n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_SAMPLES, n))


def _bounds(values, confidence: float) -> list[float]:
    import numpy as np

    tail = (1 - confidence) / 2 * 100
    return [round(float(np.percentile(values, tail)), 4), round(float(np.percentile(values, 100 - tail)), 4)]


def difference(a: list[float], b: list[float], confidence: float = 0.95, seed: int = 0) -> dict:
    """mean(a) - mean(b) over paired examples, with its interval."""
    import numpy as np

    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    means = diffs[_resamples(len(diffs), seed)].mean(axis=1)
    return {"diff": round(float(diffs.mean()), 4), "interval": _bounds(means, confidence), "examples": len(diffs)}


def ratio(a: list[float], b: list[float], confidence: float = 0.95, seed: int = 0) -> dict:
    """mean(a) / mean(b) over paired examples, with its interval; b's mean must not be 0."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if y.mean() == 0:
        raise ZeroDivisionError("the reference's mean is 0: a ratio against it is undefined")
    index = _resamples(len(x), seed)
    top, bottom = x[index].mean(axis=1), y[index].mean(axis=1)
    kept = bottom != 0  # a resample of only zero-scored references has no ratio
    return {"ratio": round(float(x.mean() / y.mean()), 4), "interval": _bounds(top[kept] / bottom[kept], confidence),
            "examples": len(x)}


def mean(a: list[float], confidence: float = 0.95, seed: int = 0) -> dict:
    """mean(a) with its percentile-bootstrap interval (one side: a candidate's own score)."""
    import numpy as np

    values = np.asarray(a, dtype=float)
    means = values[_resamples(len(values), seed)].mean(axis=1)
    return {"mean": round(float(values.mean()), 4), "interval": _bounds(means, confidence), "examples": len(values)}

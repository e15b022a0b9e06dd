"""Task accuracy on the project's held-out conversations: the candidate answers each prompt (all turns
before the last assistant turn) and is scored against that turn. The metric fits the answer:
JSON validity and per-field accuracy where the reference is a JSON object, exact match always,
ROUGE-L F1 for free text. Every mean comes with `<metric>_ci95`, a seeded bootstrap interval over the
examples: a few dozen examples decide little without one."""

from __future__ import annotations

import json
import re
from pathlib import Path


def load_examples(path: Path, limit: int) -> list[dict]:
    """`limit` conversations spread evenly over the file (held-out sets are often grouped by kind), or all."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if 0 < limit < len(lines):
        lines = [lines[i * len(lines) // limit] for i in range(limit)]
    examples = []
    for line in lines:
        record = json.loads(line)
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        examples.append({"id": f"{record.get('dataset', '')}#{record.get('record', len(examples))}",
                         "prompt": messages[:last], "reference": messages[last]["content"]})
    return examples


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower().strip(".!"))


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_json_object(text: str):
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def score(prediction: str, reference: str) -> dict:
    result = {"exact_match": float(normalize(prediction) == normalize(reference)),
              "rouge_l": rouge_l(prediction, reference)}
    expected = parse_json_object(reference)
    if expected is not None:
        got = parse_json_object(prediction)
        result["json_valid"] = float(got is not None)
        result["json_field_accuracy"] = (
            sum(1 for k, v in expected.items() if got is not None and got.get(k) == v) / len(expected) if expected else 1.0
        )
    return result


BOOTSTRAP_SAMPLES = 2000


def interval(values: list[float], seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the mean over examples (seeded: the same rows give the
    same interval)."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(BOOTSTRAP_SAMPLES, len(data)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def aggregate(rows: list[dict]) -> dict:
    metrics: dict = {}
    for key in ("exact_match", "rouge_l", "json_valid", "json_field_accuracy"):
        values = [r[key] for r in rows if key in r]
        if values:
            metrics[key] = round(sum(values) / len(values), 4)
            metrics[f"{key}_ci95"] = interval(values)
    metrics["examples"] = len(rows)
    metrics["json_examples"] = sum(1 for r in rows if "json_valid" in r)
    return metrics

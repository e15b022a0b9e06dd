"""Each build as the pipeline left it, read into a `Candidate`: its quantize manifest, its evaluation and
the per-example scores of the policy's metric (None where absent); paths from ftq.layout."""

from __future__ import annotations

import json
from pathlib import Path

from ftq import evidence
from ftq.layout import QUANTIZED, eval_dir
from ftq.promotion.policy import Candidate


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_scores(path: Path) -> dict[str, dict]:
    """Per-example rows of reports/eval/<candidate>.answers.jsonl (or .preference.jsonl, .forced.jsonl), by
    example id."""
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "id" not in row:
                raise evidence.PairingError(f"{path}: line {number}: no field 'id'")
            rows[row["id"]] = row
    return rows


def scores_file(folder: Path, name: str, metric: str) -> Path:
    from ftq.evaluation.candidate import metric_kind

    return folder / f"{name}.{metric_kind(metric)}.jsonl"


def read_candidate(root: Path, name: str, metric: str) -> Candidate:
    """models/quantized/<name>/manifest.json, reports/eval[/builds]/<name>.json and the per-example scores
    of `metric`: the answers' for a task metric, the held-out pairs' for a preference metric. Scores and
    benchmark rows count only where the evaluation report exists (an earlier run's leftovers do not)."""
    folder = root / eval_dir(name)
    metrics = read_json(folder / f"{name}.json")
    answers = scores_file(folder, name, metric)
    samples = folder / "lm_eval" / f"{name}.samples.jsonl"
    evaluated = metrics is not None
    return Candidate(
        name=name,
        manifest=read_json(root / QUANTIZED / name / "manifest.json"),
        metrics=metrics,
        scores=load_scores(answers) if evaluated and answers.exists() else None,
        benchmark_rows=read_rows(samples) if evaluated and samples.exists() else None)


def read_merged(root: Path, metric: str) -> Candidate | None:
    """merged, the reference every build is measured against; None where it is not evaluated."""
    merged = read_candidate(root, "merged", metric)
    return merged if merged.metrics is not None else None

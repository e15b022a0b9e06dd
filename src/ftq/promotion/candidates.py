"""Each build as the pipeline left it, read into a `Candidate`: its quantize manifest, its evaluation and
the per-example scores of the policy's metric (None where absent)."""

from __future__ import annotations

import json
from pathlib import Path

from ftq.evaluation import paired
from ftq.promotion.policy import Candidate
from ftq.selection import PREFERENCE_KEYS


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_candidate(root: Path, name: str, metric: str) -> Candidate:
    """models/quantized/<name>/manifest.json, reports/eval[/builds]/<name>.json and the per-example scores
    of `metric`: the answers' for a task metric, the held-out pairs' for a preference metric. Scores and
    benchmark rows count only where the evaluation report exists (an earlier run's leftovers do not)."""
    from ftq.stages.evaluate import report_dir

    folder = root / report_dir(name)
    metrics = read_json(folder / f"{name}.json")
    answers = folder / f"{name}.{'preference' if metric in PREFERENCE_KEYS else 'answers'}.jsonl"
    samples = folder / "lm_eval" / f"{name}.samples.jsonl"
    evaluated = metrics is not None
    return Candidate(
        name=name,
        manifest=read_json(root / "models" / "quantized" / name / "manifest.json"),
        metrics=metrics,
        scores=paired.load_scores(answers) if evaluated and answers.exists() else None,
        benchmark_rows=[json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
        if evaluated and samples.exists() else None)


def read_merged(root: Path, metric: str) -> Candidate | None:
    """merged, the reference every build is measured against; None where it is not evaluated."""
    merged = read_candidate(root, "merged", metric)
    return merged if merged.metrics is not None else None

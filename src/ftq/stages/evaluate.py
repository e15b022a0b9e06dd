"""Stage `evaluate`: one candidate (`base` or `merged`; `ftq evaluate` takes a build's name too) measured the
same way as every other (ftq.evaluation.candidate, shared with stage ladder, which evaluates the builds).
Outputs in reports/eval/ (ftq.layout): <candidate>.json, .answers.jsonl, .general.jsonl, .preference.jsonl
and lm_eval/<candidate>.json and .samples.jsonl."""

from __future__ import annotations

from typing import Any


def run(params: dict[str, Any], name: str) -> dict[str, Any]:
    from ftq.evaluation.candidate import evaluate

    return evaluate(params, name)
